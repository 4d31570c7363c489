"""Which of a site scan's batch-norm statistics carry over to the site's other scans.

A probe for the site cache (issue 3): the statistics-only refinement moves every BN layer's
running statistics to the scan's; a site version keeps them for the site's later scans. This
probe takes the quality benchmark's site scan of a shifted domain (seed 3000), computes its
statistics as the engine does (the cumulative average of ``--passes`` shuffles), and on each
test scan (seed 1000) prints the surface Dice against the ground truth of

- ``base``: the base model; ``own``: the test scan's own statistics (one-shot, unguarded);
- ``site``: the site scan's statistics in every BN layer (what ``cached`` uses at point 1);
- ``site@w``: the same, ``w`` of the way from the base model's (``--weights``);
- ``site:GROUPS``: the site scan's statistics only in those layer groups (``init``: the init
  path, ``down``: the encoder levels, ``up``: the decoder levels, ``out``: the output block),
  the base model's elsewhere.
- ``site@mMvV``: the running means ``M`` and the running variances ``V`` of the way
  (``--mean-var M:V``);
- ``shrink@K``: per channel, the site's shift from the base model kept in the share
  d^2 / (d^2 + K s^2), with s^2 the between-scan variance of that statistic over the base
  model's training scans (variances compared as logs): an empirical-Bayes shrinkage that
  keeps a shift only where it stands out of the source's scan-to-scan noise (``--shrink K``).
- ``pool@K``: the statistics of the site's first ``K`` scans pooled as a site version pools
  them (the base model's weighing ``--prior`` scans; ``--pool K ...``), as if each scan had
  been saved; ``stack@K``: the statistics of those scans' slices taken together, as the
  benchmark's refine-on-N computes them (the paper's Table 3 model, on the site's scans).
- ``cons@LRxE``: the site scan's statistics at the first ``--weights`` point, then the
  paper's self-training of the init path (Eq. 2, Adam at ``LR``, batch norm frozen at those
  statistics, at most ``E`` epochs) on the site scan (``--consolidate LR:E``): the early
  head is trained towards the final output that the statistics gave.

and the mean share of the one-shot gain each keeps. For every variant it also prints the
volumetric and the surface Dice between the early and the final mask on the site scan: the
first is the label-free figure that decides whether a site version is saved (it must beat
the base model's), the second the report's self-consistency. It reads the models and cases
that ``bench/adapt_quality.py --work var/bench-stats`` wrote, e.g.::

    python bench/site_probe.py --work var/bench-stats --task brain --domain c15t
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.adapt_quality import SITE_SEED, TEST_SEED, UNSEEN_SEED, Case, cases  # noqa: E402
from model_store.base_models import BaseModelRegistry  # noqa: E402
from sitefit import defaults  # noqa: E402
from sitefit.metrics import overlap_per_class  # noqa: E402
from sitefit.volume import load_label_map, load_scan  # noqa: E402
from worker.batchnorm import interpolate_statistics, is_running_statistic  # noqa: E402
from worker.inference import foreground_dice, predict  # noqa: E402
from worker.nets import SegmentationNet  # noqa: E402
from worker.preprocess import PreparedScan, prepare_scan  # noqa: E402
from worker.refinement import RefineConfig, refine, scan_statistics  # noqa: E402
from worker.site_update import pooled_state  # noqa: E402
from worker.weights import build_net, mutable_state  # noqa: E402

GROUPS = {
    "init": ("init_path.",),
    "down": ("body.down.",),
    "up": ("body.up.",),
    "out": ("body.out_",),
}


def consolidate(
    net: SegmentationNet, prepared: PreparedScan, classes: int, lr: float, epochs: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``net``'s state after the paper's self-training on ``prepared`` with BN frozen."""
    start = predict(net, prepared.slices, defaults.REFINE_BATCH_SIZE, region=prepared.region)
    config = RefineConfig(learning_rate=lr, batchnorm="frozen", max_epochs=epochs)
    result = refine(net, prepared.slices, classes,
                    foreground_dice(start.early, start.final, classes), config,
                    region=prepared.region)  # fmt: skip
    return mutable_state(net), result.dice_trace


def restrict(
    base: dict[str, torch.Tensor], site: dict[str, torch.Tensor], groups: list[str]
) -> dict[str, torch.Tensor]:
    """``base`` with the running statistics of ``groups`` taken from ``site``."""
    prefixes = tuple(p for g in groups for p in GROUPS[g])
    return {
        k: site[k] if is_running_statistic(k) and k.startswith(prefixes) else v
        for k, v in base.items()
    }


def split_statistics(
    base: dict[str, torch.Tensor],
    site: dict[str, torch.Tensor],
    mean_weight: float,
    var_weight: float,
) -> dict[str, torch.Tensor]:
    """``site`` with the running means ``mean_weight`` and the running variances
    ``var_weight`` of the way from ``base``'s."""
    means = interpolate_statistics(base, site, mean_weight)
    variances = interpolate_statistics(base, site, var_weight)
    return {k: variances[k] if k.endswith("running_var") else means[k] for k in site}


def _coordinates(key: str, value: torch.Tensor) -> torch.Tensor:
    """Running means as they are, running variances as logs (a scale is multiplicative); a
    dead channel's variance of 0 counts as 1e-12, far below BN's eps."""
    if key.endswith("running_var"):
        return value.double().clamp_min(1e-12).log()
    return value.double()


def between_scan_variance(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per channel, the variance over scans of each BN running statistic (log for variances)."""
    return {
        key: torch.stack([_coordinates(key, s[key]) for s in states]).var(dim=0)
        for key in states[0]
        if is_running_statistic(key)
    }


def shrink(
    base: dict[str, torch.Tensor],
    site: dict[str, torch.Tensor],
    spread: dict[str, torch.Tensor],
    k: float,
) -> dict[str, torch.Tensor]:
    """Per channel, the site's shift from the base kept in the share d^2 / (d^2 + k s^2), with
    s^2 the source scans' between-scan variance (positive-part James-Stein per coordinate)."""
    out = dict(site)
    for key, noise in spread.items():
        start, end = _coordinates(key, base[key]), _coordinates(key, site[key])
        shift = end - start
        keep = shift.square() / (shift.square() + k * noise).clamp_min(1e-30)
        mixed = start + keep * shift
        out[key] = (mixed.exp() if key.endswith("running_var") else mixed).to(site[key].dtype)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brain")
    parser.add_argument("--domain", default="c15t")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench-stats")
    parser.add_argument("--fov-mm", type=float, default=80.0, help="as adapt_quality's")
    parser.add_argument("--n-test", type=int, default=5, help="as adapt_quality's")
    parser.add_argument(
        "--test-seed", type=int, default=TEST_SEED,
        help=f"the scans to test on ({TEST_SEED}: the benchmark's; {UNSEEN_SEED}: others)",
    )  # fmt: skip
    parser.add_argument("--version", type=int, help="of the base model (default: the latest)")
    parser.add_argument(
        "--site-scans", type=int, default=1,
        help="also the --weights variants of the 2nd..Nth site scan, each judged on its scan",
    )  # fmt: skip
    parser.add_argument("--passes", type=int, default=defaults.REFINE_STATISTICS_PASSES)
    parser.add_argument(
        "--pool", type=int, nargs="*", default=[],
        help="K: the site's first K scans pooled as a version pools them, and stacked",
    )  # fmt: skip
    parser.add_argument("--prior", type=float, default=defaults.SITE_STATISTICS_PRIOR)
    parser.add_argument("--weights", type=float, nargs="*", default=[0.5, 0.75])
    parser.add_argument(
        "--mean-var", nargs="*", default=[],
        help="MEAN:VAR pairs: the running means MEAN and the variances VAR of the way there",
    )  # fmt: skip
    parser.add_argument(
        "--shrink",
        type=float,
        nargs="*",
        default=[],
        help="K: per-channel shrinkage to the base, d^2 / (d^2 + K * source between-scan var)",
    )
    parser.add_argument(
        "--groups", nargs="*", default=["init", "init+down", "init+down+up"],
        help="layer groups joined by '+', from: " + ", ".join(GROUPS),
    )  # fmt: skip
    parser.add_argument(
        "--consolidate", nargs="*", default=[],
        help="LR:EPOCHS: self-training of the init path after the first --weights point",
    )  # fmt: skip
    args = parser.parse_args()

    registry = BaseModelRegistry(args.work / "home" / "models")
    model = f"bench-{args.task}" + (f"@{args.version}" if args.version else "")
    spec = registry.spec(model)
    tensors = registry.tensors(spec)
    classes = len(spec.classes)
    foreground = {k: v for k, v in spec.classes.items() if k}
    device = torch.device("cpu")

    def load(case: Case) -> tuple[PreparedScan, np.ndarray, tuple[float, float, float]]:
        scan = load_scan(case.image, 10**9)
        reference = load_label_map(case.label, like=scan)
        return prepare_scan(scan, spec.slice_axis, device), reference, scan.spacing_mm

    loaded = max([args.site_scans, *args.pool])
    site_cases = cases(args.task, args.domain, loaded, SITE_SEED, args.fov_mm, args.work)
    test = cases(args.task, args.domain, args.n_test, args.test_seed, args.fov_mm, args.work)
    site_scans = [load(case) for case in site_cases]
    site_scan = site_scans[0][0]
    base_state = mutable_state(build_net(spec, tensors, device))
    site_states = [
        scan_statistics(build_net(spec, tensors, device), scan.slices, classes, args.passes)
        for scan, _, _ in site_scans
    ]
    site_state = site_states[0]

    variants: dict[str, dict[str, torch.Tensor] | None] = {"base": base_state, "own": None}
    variants["site"] = site_state
    for weight in args.weights:
        variants[f"site@{weight:g}"] = interpolate_statistics(base_state, site_state, weight)
    # the same from each further site scan, judged on that scan: "site2@0.75", "base2"
    scan_of: dict[str, int] = {}
    for k in args.pool:
        pool = base_state
        for index, state in enumerate(site_states[:k]):  # the site_update running pool
            pool = pooled_state(pool, state, index + args.prior)
        variants[f"pool@{k}"] = pool
        stacked = torch.cat([scan.slices for scan, _, _ in site_scans[:k]])
        net = build_net(spec, tensors, device)
        variants[f"stack@{k}"] = {
            **base_state,
            **scan_statistics(net, stacked, classes, args.passes),
        }
    for index, state in enumerate(site_states[1 : args.site_scans], start=2):
        variants[f"base{index}"] = base_state
        scan_of[f"base{index}"] = index - 1
        for weight in args.weights:
            name = f"site{index}@{weight:g}"
            variants[name] = interpolate_statistics(base_state, state, weight)
            scan_of[name] = index - 1
    for pair in args.mean_var:
        mean_weight, var_weight = (float(x) for x in pair.split(":"))
        variants[f"site@m{mean_weight:g}v{var_weight:g}"] = split_statistics(
            base_state, site_state, mean_weight, var_weight
        )
    if args.shrink:
        training = args.work / "data" / f"{args.task}-a3t-train" / "imagesTr"
        source = sorted(training.glob("*_0000.nii.gz"))  # the images, as cases() reads them
        source_states = [
            scan_statistics(
                build_net(spec, tensors, device),
                prepare_scan(load_scan(path, 10**9), spec.slice_axis, device).slices, classes,
                args.passes,
            )
            for path in source
        ]  # fmt: skip
        spread = between_scan_variance(source_states)
        for k in args.shrink:
            variants[f"shrink@{k:g}"] = shrink(base_state, site_state, spread, k)
    for groups in args.groups:
        variants[f"site:{groups}"] = restrict(base_state, site_state, groups.split("+"))
    for pair in args.consolidate:
        lr, epochs = float(pair.split(":")[0]), int(pair.split(":")[1])
        net = build_net(spec, tensors, device)
        net.load_state_dict(
            interpolate_statistics(base_state, site_state, args.weights[0]), strict=False
        )
        variants[f"cons@{lr:g}x{epochs}"], trace = consolidate(net, site_scan, classes, lr, epochs)
        print(f"cons@{lr:g}x{epochs}: Dice(early, final) per epoch on the site scan {trace}")
    consistency = {}
    for name, state in variants.items():
        if state is not None:
            judged, _, spacing = site_scans[scan_of.get(name, 0)]
            net = build_net(spec, tensors, device)
            net.load_state_dict(state, strict=False)
            p = predict(net, judged.slices, defaults.REFINE_BATCH_SIZE, region=judged.region)
            early, final = judged.volume(p.early), judged.volume(p.final)
            surface = overlap_per_class(early, final, foreground, spacing, 1.0)
            consistency[name] = (
                foreground_dice(p.early, p.final, classes),
                float(np.mean([f["surface_dice"] or 0.0 for f in surface.values()])),
            )
    print("site scan Dice / surface Dice (early, final): "
          + " ".join(f"{n} {c:.3f}/{d:.3f}" for n, (c, d) in consistency.items()),
          flush=True)  # fmt: skip

    scores: dict[str, list[float]] = {name: [] for name in variants}
    for index, case in enumerate(test):
        prepared, reference, spacing = load(case)
        for name, state in variants.items():
            net = build_net(spec, tensors, device)
            if state is None:
                state = scan_statistics(net, prepared.slices, classes, args.passes)
            net.load_state_dict(state, strict=False)
            prediction = predict(net, prepared.slices, 20, region=prepared.region)
            labels = prepared.volume(prediction.final)
            figures = overlap_per_class(labels, reference, foreground, spacing, 1.0)
            scores[name].append(
                float(np.mean([f["surface_dice"] or 0.0 for f in figures.values()]))
            )
        print(
            f"scan {index}: " + " ".join(f"{n} {s[-1]:.3f}" for n, s in scores.items()), flush=True
        )
    base, own = np.mean(scores["base"]), np.mean(scores["own"])
    print(f"{args.task} {args.domain}: mean sDice (share of the one-shot gain {own - base:+.3f})")
    for name, values in scores.items():
        share = (np.mean(values) - base) / (own - base) if abs(own - base) >= 0.01 else float("nan")
        print(f"  {name:22s} {np.mean(values):.3f}  {share:6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
