"""Per-epoch true surface Dice of an unguarded refinement, for one scan and one setting.

A small probe of the refinement options (batch-norm mode, learning rate) on a scan of the
quality benchmark's data, e.g.::

    python bench/refine_probe.py --task heart --domain b3t --batchnorm frozen --lr 1e-4

It prints the base model's surface Dice against the ground truth, Dice(early, final) before
refinement, then the surface Dice of the final mask and Dice(early, final) after each epoch
(the stopping rule is off so every epoch is shown). It reads the base models and cases that
``bench/adapt_quality.py --work var/bench1`` wrote; ``--data`` names another dataset folder
(e.g. one of ``bench/guard_calibration.py``'s). ``--lr 0`` is the statistics-only variant:
with BN ``train`` only the batch-norm running statistics move; with ``--average cumulative``
the "epochs" are the points of ``--path`` on the way to the scan's statistics, averaged over
``--passes`` shuffles (``--seed``: which shuffles), e.g.::

    python bench/refine_probe.py --work var/bench-stats --task brain --domain b3t --lr 0 \
        --average cumulative --passes 1 --path 1 --seed 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_store.base_models import BaseModelRegistry  # noqa: E402
from sitefit import defaults  # noqa: E402
from sitefit.metrics import overlap_per_class  # noqa: E402
from sitefit.volume import load_label_map, load_scan  # noqa: E402
from worker.inference import foreground_dice, predict  # noqa: E402
from worker.preprocess import prepare_scan  # noqa: E402
from worker.refinement import RefineConfig, refine  # noqa: E402
from worker.weights import build_net  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="heart")
    parser.add_argument("--domain", default="b3t")
    parser.add_argument("--batchnorm", choices=["train", "frozen"], default="train")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench1")
    parser.add_argument("--data", type=Path, help="dataset folder (default: the first test set)")
    parser.add_argument("--index", type=int, default=0, help="which scan of the dataset")
    parser.add_argument("--average", choices=["cumulative", "momentum"], default="momentum")
    parser.add_argument("--passes", type=int, default=defaults.REFINE_STATISTICS_PASSES)
    parser.add_argument(
        "--path", type=float, nargs="+", default=list(defaults.REFINE_STATISTICS_PATH)
    )
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    args = parser.parse_args()

    registry = BaseModelRegistry(args.work / "home" / "models")
    spec = registry.spec(f"bench-{args.task}")
    data = args.data or sorted((args.work / "data").glob(f"{args.task}-{args.domain}-1000-*"))[0]
    scan = load_scan(sorted((data / "imagesTr").glob("*"))[args.index], 10**9)
    reference = load_label_map(sorted((data / "labelsTr").glob("*"))[args.index], like=scan)
    prepared = prepare_scan(scan, spec.slice_axis, torch.device("cpu"))
    foreground = {k: v for k, v in spec.classes.items() if k}

    def sdice(labels: torch.Tensor) -> float:
        figures = overlap_per_class(prepared.volume(labels), reference, foreground,
                                    scan.spacing_mm, 1.0)  # fmt: skip
        return float(np.mean([f["surface_dice"] or 0.0 for f in figures.values()]))

    net = build_net(spec, registry.tensors(spec), torch.device("cpu"))
    base = predict(net, prepared.slices, 20, region=prepared.region)
    classes = len(spec.classes)
    config = RefineConfig(max_epochs=args.epochs, learning_rate=args.lr,
                          batchnorm=args.batchnorm, stop_delta=-1.0,
                          statistics_average=args.average, statistics_passes=args.passes,
                          statistics_path=tuple(args.path), seed=args.seed)  # fmt: skip
    before = foreground_dice(base.early, base.final, classes)
    result = refine(net, prepared.slices, classes, before, config, keep_states=True,
                    region=prepared.region)  # fmt: skip
    print(
        f"{args.task} {args.domain} BN {args.batchnorm} lr {args.lr:g} "
        f"({args.average if args.lr == 0 else 'self-training'}): base sDice "
        f"{sdice(base.final):.3f}, Dice(early, final) {before:.3f}; per epoch sDice "
        + " ".join(f"{sdice(p.final):.3f}" for p in result.predictions)
        + "; Dice(early, final) "
        + " ".join(f"{d:.2f}" for d in result.dice_trace)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
