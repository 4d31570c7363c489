"""Does Dice(early, final) follow the statistics path? A probe of the site save rule.

A site version is saved only when its self-consistency Dice(early, final) on the scan beats
that of the weights the refinement started from (issue 3). With the statistics-only
refinement the early head is never trained, so whether that figure rises with the true gain
depends on how the early head reads the init path's features. For the quality benchmark's
site scan of each ``--domains`` (seed 3000), at each point w of the way from the base model's
batch-norm statistics to the scan's, this prints the final and the early output's surface
Dice against the ground truth and Dice(early, final), for each ``--versions`` of the
benchmark's base model, labelled with the statistics its early head was trained under
(``sitefit train --head-statistics``): ``source``, the U-Net's running statistics, or
``scan``, each training scan's own, the regime the statistics-only refinement moves a target
scan to; and with its slices' augmentation (``--head-augmentation``: ``none`` or
``intensity``). Versions trained with the same data, epochs and seed share the U-Net bitwise.

It reads the models and cases that ``bench/adapt_quality.py --work var/bench-stats`` wrote
(trained once with ``--head-statistics source``, once with ``scan``), e.g.::

    python bench/head_probe.py --task brain --versions 1 2 --domains b3t c15t d3t
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.adapt_quality import SITE_SEED, cases  # noqa: E402
from model_store.base_models import BaseModelRegistry  # noqa: E402
from sitefit import defaults  # noqa: E402
from sitefit.metrics import overlap_per_class  # noqa: E402
from sitefit.volume import load_label_map, load_scan  # noqa: E402
from worker.batchnorm import interpolate_statistics  # noqa: E402
from worker.inference import foreground_dice, predict  # noqa: E402
from worker.preprocess import prepare_scan  # noqa: E402
from worker.refinement import scan_statistics  # noqa: E402
from worker.weights import build_net, mutable_state  # noqa: E402


def mean_surface_dice(
    labels: np.ndarray,
    reference: np.ndarray,
    foreground: dict[int, str],
    spacing: tuple[float, float, float],
) -> float:
    """Surface Dice at 1 mm against ``reference``, the mean over the foreground classes."""
    figures = overlap_per_class(labels, reference, foreground, spacing, 1.0)
    return float(np.mean([f["surface_dice"] or 0.0 for f in figures.values()]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brain")
    parser.add_argument("--domains", nargs="+", default=["b3t", "c15t", "d3t"])
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench-stats")
    parser.add_argument("--fov-mm", type=float, default=80.0, help="as adapt_quality's")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    registry = BaseModelRegistry(args.work / "home" / "models")
    device = torch.device("cpu")
    models, unets = [], []
    for version in args.versions:
        spec = registry.spec(f"bench-{args.task}@{version}")
        tensors = registry.tensors(spec)
        models.append((spec, partial(build_net, spec, tensors, device)))
        unets.append({k: v for k, v in tensors.items() if not k.startswith("early_head.")})
    if any(u.keys() != unets[0].keys() or any((u[k] != unets[0][k]).any() for k in u)
           for u in unets):  # fmt: skip
        print("note: the versions' U-Nets differ; the statistics are the first version's")
    spec, build = models[0]
    classes = len(spec.classes)
    foreground = {k: v for k, v in spec.classes.items() if k}
    base_state = mutable_state(build())
    for domain in args.domains:
        case = cases(args.task, domain, 1, SITE_SEED, args.fov_mm, args.work)[0]
        scan = load_scan(case.image, 10**9)
        reference = load_label_map(case.label, like=scan)
        prepared = prepare_scan(scan, spec.slice_axis, device)
        site = scan_statistics(build(), prepared.slices, classes)
        for weight in args.weights:
            cells, final = [], 0.0
            for model, build_model in models:
                net = build_model()
                net.load_state_dict(interpolate_statistics(base_state, site, weight), strict=False)
                p = predict(net, prepared.slices, defaults.REFINE_BATCH_SIZE,
                            region=prepared.region)  # fmt: skip
                early, final = (
                    mean_surface_dice(prepared.volume(labels), reference, foreground,
                                      scan.spacing_mm)
                    for labels in (p.early, p.final)
                )  # fmt: skip
                consistency = foreground_dice(p.early, p.final, classes)
                label = (
                    f"v{model.version} ({model.training.head_statistics}, "
                    f"{model.training.head_augmentation})"
                )
                cells.append(f"{label}: early {early:.3f} SC {consistency:.3f}")
            print(f"{args.task} {domain} w {weight:g}: final {final:.3f} | " + " | ".join(cells),
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
