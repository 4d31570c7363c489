"""Time sitefit's surface Dice against DeepMind's ``surface-distance`` package on one mask pair.

    python bench/metric_speed.py [--size 256] [--repeats 3] [--tolerance 1.0] [--write-docs]

Builds two overlapping smooth blobs (close but different) in a SIZE^3 volume at an anisotropic
spacing, times both implementations on them (median of REPEATS, interleaved in one run), checks
that they agree to 1e-6 (exit status 1 if not), prints a small table, and ends with one line of
JSON with the figures. With ``--write-docs`` the table also goes to ``docs/benchmarks.md``
between ``<!-- metric_speed:begin -->`` and ``<!-- metric_speed:end -->`` (other sections are
left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sitefit.metrics import surface_dice

AGREEMENT = 1e-6
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def smooth_field(
    shape: tuple[int, int, int], rng: np.random.Generator, waves: int
) -> npt.NDArray[np.float32]:
    """Sum of `waves` random low-frequency plane waves over the grid, amplitude about 1."""
    axes = [np.arange(n, dtype=np.float32) / n for n in shape]
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(waves):
        freq = rng.uniform(1.0, 4.0, size=3) * rng.choice([-1.0, 1.0], size=3) * 2 * np.pi
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        arg = (
            (freq[0] * axes[0]).astype(np.float32)[:, None, None]
            + (freq[1] * axes[1]).astype(np.float32)[None, :, None]
            + (freq[2] * axes[2]).astype(np.float32)[None, None, :]
            + phase
        )
        field += np.cos(arg, out=arg)
    field /= np.float32(np.sqrt(waves / 2))
    return field


def blob_pair(size: int, seed: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Two overlapping smooth blobs: the second is the first shifted, swollen and re-wobbled."""
    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    wobble = smooth_field(shape, rng, waves=8)
    extra = smooth_field(shape, rng, waves=8)
    grid = [np.arange(n, dtype=np.float32) / n for n in shape]

    def ellipsoid(centre: Sequence[float], radii: Sequence[float]) -> npt.NDArray[np.float32]:
        terms = [
            ((g - np.float32(c)) / np.float32(r)) ** 2
            for g, c, r in zip(grid, centre, radii, strict=True)
        ]
        total = terms[0][:, None, None] + terms[1][None, :, None] + terms[2][None, None, :]
        return total.astype(np.float32, copy=False)

    a = ellipsoid((0.5, 0.5, 0.5), (0.36, 0.30, 0.26)) + 0.12 * wobble < 1.0
    b = ellipsoid((0.503, 0.498, 0.5), (0.36, 0.30, 0.26)) + 0.12 * wobble + 0.02 * extra < 1.01
    return a, b


def package_surface_dice(
    pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_], spacing: Sequence[float], tol: float
) -> float:
    np.Inf = np.inf  # type: ignore[attr-defined]  # the package still uses it; NumPy 2 removed it
    import surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = surface_distance.compute_surface_distances(ref, pred, list(spacing))
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, tol))


def sitefit_surface_dice(
    pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_], spacing: Sequence[float], tol: float
) -> float:
    value = surface_dice(pred, ref, spacing, tol)
    if value is None:
        raise SystemExit("both masks are empty: nothing to time")
    return value


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="edge of the cubic volume (voxels)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median kept)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance, mm")
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=(0.9, 1.1, 1.5), metavar="MM", help="voxel size"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write-docs", action="store_true", help="write the table to docs/benchmarks.md"
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="the Markdown file to update")
    args = parser.parse_args(argv)
    spacing = [float(s) for s in args.spacing]

    t0 = time.perf_counter()
    pred, ref = blob_pair(args.size, args.seed)
    build_s = time.perf_counter() - t0

    sitefit_surface_dice(pred, ref, spacing, args.tolerance)  # warm the lookup-table caches
    times: dict[str, list[float]] = {"package": [], "sitefit": []}
    values: dict[str, float] = {}
    for _ in range(max(1, args.repeats)):
        values["package"], seconds = timed(
            lambda: package_surface_dice(pred, ref, spacing, args.tolerance)
        )
        times["package"].append(seconds)
        values["sitefit"], seconds = timed(
            lambda: sitefit_surface_dice(pred, ref, spacing, args.tolerance)
        )
        times["sitefit"].append(seconds)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    diff = abs(values["package"] - values["sitefit"])
    agree = diff <= AGREEMENT
    ratio = med["package"] / med["sitefit"]

    print(
        f"masks: {args.size}^3, spacing {spacing} mm, tolerance {args.tolerance} mm, "
        f"{int(pred.sum())} / {int(ref.sum())} voxels (built in {build_s:.1f} s)"
    )
    print(f"{'implementation':<16}{'surface Dice':>16}{'median s':>12}{'runs (s)':>30}")
    for name in ("package", "sitefit"):
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:<16}{values[name]:>16.10f}{med[name]:>12.4f}{runs:>30}")
    print(f"speed-up {ratio:.1f}x; |difference| {diff:.2e} ({'ok' if agree else 'MISMATCH'})")
    if args.write_docs:
        write_docs(args, argv, spacing, times, values, med, ratio, diff, agree, pred, ref)
    print(
        json.dumps(
            {
                "ratio_package_over_sitefit": round(ratio, 2),
                "sdice_package": values["package"],
                "sdice_sitefit": values["sitefit"],
                "abs_difference": diff,
                "agree_1e-6": agree,
                "seconds_package": round(med["package"], 4),
                "seconds_sitefit": round(med["sitefit"], 4),
                "size": args.size,
                "spacing_mm": spacing,
                "tolerance_mm": args.tolerance,
                "repeats": args.repeats,
            }
        )
    )
    return 0 if agree else 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_docs(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    spacing: list[float],
    times: dict[str, list[float]],
    values: dict[str, float],
    med: dict[str, float],
    ratio: float,
    diff: float,
    agree: bool,
    pred: npt.NDArray[np.bool_],
    ref: npt.NDArray[np.bool_],
) -> None:
    """The figures as a Markdown section of ``args.out`` (key ``metric_speed``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.report_file import replace_section

    command = " ".join(["python bench/metric_speed.py", *(sys.argv[1:] if argv is None else argv)])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"Command: `{command}` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}).  ",
        f"Masks: two overlapping smooth blobs in a {args.size}^3 volume, spacing {spacing} mm, "
        f"{int(pred.sum())} / {int(ref.sum())} voxels; tolerance {args.tolerance} mm; median "
        f"of {len(times['package'])} interleaved runs each.",
        "",
        "| implementation | surface Dice | median s | runs (s) |",
        "|---|---|---|---|",
    ]
    for name, label in (("package", "`surface-distance` 0.1"), ("sitefit", "sitefit")):
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        lines.append(f"| {label} | {values[name]:.10f} | {med[name]:.4f} | {runs} |")
    lines += [
        "",
        f"Speed-up **{ratio:.1f}x**; |difference| {diff:.2e} "
        f"({'agree to 1e-6' if agree else 'MISMATCH'}).",
        "",
        f"Machine: {_cpu_model()}, {cores} cores visible, "
        f"Python {platform.python_version()}, NumPy {np.__version__}.",
    ]
    replace_section(args.out, "metric_speed", "Surface Dice speed: sitefit vs `surface-distance`",
                    "\n".join(lines))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
