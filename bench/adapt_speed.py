"""Refinement speed: sitefit's one-shot adapt+segment against the authors' loop (issue 5).

    python bench/adapt_speed.py --quick         # the 96^3 volume only
    python bench/adapt_speed.py                 # the benchmark volume, 176 slices of 256x256
    python bench/adapt_speed.py --quality       # fp32 vs fast path (and the reference) on phantoms
    python bench/adapt_speed.py --quick --refine-lr 0.001   # sitefit running the paper's loop

sitefit runs the product default unless told otherwise: batch-norm statistics only
(``--refine-lr 0``, each step a forward pass), with the guard's threshold for that mode; the
baseline is always the authors' self-training at lr 1e-3. ``--refine-lr 0.001`` compares the
same loop in both (its results go to ``results-lr0.001.json`` and the docs section
``adapt_speed-lr0.001``).

Both methods start from the same weights (one base model, loaded fresh for every run) and see
the same batches in the same order: sitefit runs what the engine runs in mode ``adapt`` (base
pass, ``refine`` with kept states, the guard), the baseline is ``bench/reference_loop.py``.
Every measured run is a fresh subprocess (so the peak RSS, ``VmHWM``, is that run's own;
on CUDA ``torch.cuda.max_memory_allocated``); runs alternate between the methods (ABBA...) and
figures are medians over ``--repeats`` runs, so a noisy shared machine hits both alike. The
compared time is adapt+segment (everything after the slices are on the device); loading and
min-max scaling, the same for both, are reported apart.

Volumes (brain phantoms of the shifted domain ``d3t``, made by :func:`make_subject`, in
canonical RAS order, slices along axis 2 as the model was trained). d3t has 0.9 mm pixels and
2 mm slices (low SNR, gamma 1.25); the subject is generated at a field of view that gives
about the wanted in-plane grid, its slices are reformatted (linear interpolation; labels
nearest) to the wanted count, and the in-plane grid is padded (with the volume's minimum,
label 0) or cropped, centred, to the exact shape: 256x256x176 from FOV 200 mm (222x222 pixels
x 100 slices -> 176 slices of 1.13 mm), 96x96x96 from FOV 86.4 mm (96x96 x 43 slices -> 96 of
0.89 mm). The phantom's head scales with the field of view, so each volume has its own base
model, trained on heads of its size (in voxels). The shifted domain
b3t was tried first: this base model over-segments it (base surface Dice 0.00), which makes
a quality comparison vacuous. Cached under ``var/bench-speed``.

Base models: U-Net + early head trained on 4 source (a3t) phantoms, 4 + 2 epochs, at 96 mm
FOV for the quick volume (``speed-brain``) and at 200 mm for the full one
(``speed-brain-256``; a model trained on the small heads fails on the large ones, base
surface Dice 0.04), cached under ``var/bench-speed/home``: modest, their quality only needs to
be non-trivial.

Also measured (in-process, sitefit only, fixed number of epochs): time against the number of
slices and against the training batch size. The table goes to ``docs/benchmarks.md`` between
``<!-- adapt_speed:begin -->`` and ``<!-- adapt_speed:end -->`` (rendered from the latest
stored result of every volume and device, so a quick run does not erase a full one). The last
line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference_loop import ReferenceConfig, reference_refine  # noqa: E402
from bench.report_file import replace_section  # noqa: E402
from model_store.base_models import BaseModelRegistry  # noqa: E402
from model_store.spec import ModelSpec  # noqa: E402
from sitefit import defaults  # noqa: E402
from sitefit.exceptions import ModelNotFoundError  # noqa: E402
from sitefit.metrics import dice as volume_dice  # noqa: E402
from sitefit.metrics import surface_dice  # noqa: E402
from sitefit.phantoms import DOMAINS, make_subject, write_dataset  # noqa: E402
from sitefit.settings import StatisticsAverage  # noqa: E402
from sitefit.volume import load_label_map, load_scan, save_image_atomic  # noqa: E402
from worker.guard import GuardConfig, acceptance, default_consistency_gain, judge  # noqa: E402
from worker.inference import Precision, Region, foreground_dice, predict  # noqa: E402
from worker.nets import NetConfig, SegmentationNet  # noqa: E402
from worker.preprocess import prepare_scan  # noqa: E402
from worker.refinement import RefineConfig, refine  # noqa: E402
from worker.training import TrainConfig, train_base_model  # noqa: E402
from worker.weights import load_numpy, net_config  # noqa: E402

nib: Any = nibabel
WORK = ROOT / "var" / "bench-speed"
DOCS = ROOT / "docs" / "benchmarks.md"
TASK = "brain"
DOMAIN = "d3t"
VOLUME_SEED = 1000
MARKER = "ADAPT_SPEED_RUN "  # prefix of a measured run's result line


@dataclass(frozen=True)
class Volume:
    name: str
    shape: tuple[int, int, int]  # canonical (RAS) voxels; slices along axis 2
    fov_mm: float  # make_subject's field of view on DOMAIN before padding/cropping
    model: str  # the base model both methods start from
    train_fov_mm: float  # its training phantoms' field of view: heads of this volume's size


VOLUMES = {
    "full": Volume("full", (256, 256, 176), 200.0, "speed-brain-256", 200.0),
    "quick": Volume("quick", (96, 96, 96), 86.4, "speed-brain", 96.0),
}


# ---------------------------------------------------------------------------------------
# Data and model


def base_model(args: argparse.Namespace, volume: Volume) -> ModelSpec:
    """The volume's cached base model, trained on source phantoms when missing or trained
    otherwise."""
    registry = BaseModelRegistry(args.work / "home" / "models")
    wanted = (args.train_epochs, args.train_head_epochs, args.train_subjects)
    try:
        spec = registry.spec(volume.model)
        info = spec.training
        if (
            info.epochs,
            info.head_epochs,
            len(info.train_cases) + len(info.validation_cases),
        ) == wanted:
            return spec
    except ModelNotFoundError:
        pass
    source = next(n for n, d in DOMAINS.items() if d.role == "source")
    data = write_dataset(
        TASK,
        source,
        args.train_subjects,
        0,
        args.work / "data" / f"{TASK}-{source}-{args.train_subjects}-fov{volume.train_fov_mm:g}",
        volume.train_fov_mm,
    )
    print(
        f"training base model {volume.model} on {args.train_subjects} {source} phantoms at "
        f"{volume.train_fov_mm:g} mm",
        flush=True,
    )
    config = TrainConfig(epochs=args.train_epochs, head_epochs=args.train_head_epochs, seed=0)
    return train_base_model(
        data,
        volume.model,
        config,
        registry,
        torch.device("cpu"),
        log=lambda line: print(f"  {line}", flush=True),
    )


def model_weights(work: Path, volume: Volume) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    registry = BaseModelRegistry(work / "home" / "models")
    spec = registry.spec(volume.model)
    return spec, registry.tensors(spec)


def fresh_net(
    config: NetConfig, tensors: dict[str, np.ndarray], device: torch.device
) -> SegmentationNet:
    """A new net holding ``tensors``, in eval mode: every run of either method starts here."""
    net = SegmentationNet(config)
    load_numpy(net, tensors)
    net.to(device).eval()
    return net


def fit(array: np.ndarray, shape: tuple[int, ...], fill: float) -> tuple[np.ndarray, list[int]]:
    """Centre-pad (with ``fill``) or centre-crop ``array`` to ``shape``; voxel offsets too.

    ``offsets[i]`` is the index in the old array of new index 0 along axis ``i``.
    """
    out = np.full(shape, fill, dtype=array.dtype)
    src, dst, offsets = [], [], []
    for n, t in zip(array.shape, shape, strict=True):
        if n >= t:
            start = (n - t) // 2
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
            offsets.append(start)
        else:
            before = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(before, before + n))
            offsets.append(-before)
    out[tuple(dst)] = array[tuple(src)]
    return out, offsets


def volume_files(volume: Volume, work: Path) -> tuple[Path, Path]:
    """The benchmark volume and its ground truth as NIfTI files (made once, then cached)."""
    folder = work / "volumes"
    image_path = folder / f"{volume.name}_{DOMAIN}_{VOLUME_SEED}_0000.nii"
    label_path = folder / f"{volume.name}_{DOMAIN}_{VOLUME_SEED}.nii"
    if image_path.exists() and label_path.exists():
        return image_path, label_path
    folder.mkdir(parents=True, exist_ok=True)
    phantom = make_subject(TASK, DOMAIN, VOLUME_SEED, volume.fov_mm)
    image = nib.as_closest_canonical(nib.Nifti1Image(phantom.image, phantom.affine))
    label = nib.as_closest_canonical(nib.Nifti1Image(phantom.label, phantom.affine))
    data = np.asarray(image.dataobj, dtype=np.float32)
    labels = np.asarray(label.dataobj, dtype=np.uint8)
    # d3t has 2 mm slices: reformat along the slice axis to the wanted count (linear for the
    # image, nearest for the labels; first and last slice stay put), as a reader would
    n, t = data.shape[2], volume.shape[2]
    stretch = np.eye(4)
    if n != t:
        data = ndimage.zoom(data, (1, 1, t / n), order=1)
        labels = ndimage.zoom(labels, (1, 1, t / n), order=0)
        stretch[2, 2] = (n - 1) / (t - 1)
    image_data, offsets = fit(data, volume.shape, float(data.min()))
    label_data, _ = fit(labels, volume.shape, 0)
    shift = np.eye(4)
    shift[:3, 3] = offsets
    affine = image.affine @ stretch @ shift
    for array, path in ((image_data, image_path), (label_data, label_path)):
        out = nib.Nifti1Image(array, affine)
        out.header.set_xyzt_units("mm")
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        save_image_atomic(out, path)
    print(
        f"volume {volume.name}: {phantom.image.shape} on {DOMAIN} at {volume.fov_mm:g} mm -> "
        f"canonical {image.shape}, {n} -> {t} slices -> {volume.shape}",
        flush=True,
    )
    return image_path, label_path


# ---------------------------------------------------------------------------------------
# One measured run (in a fresh process)


@dataclass
class MethodRun:
    """What one run of one method gives: stage times, epochs, and the segmentation."""

    method: str
    seconds: dict[str, float]
    epochs: int
    dice_trace: list[float]
    final: torch.Tensor  # (N, H, W) labels of the output
    extra: dict[str, Any] = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Settings:
    max_epochs: int = defaults.REFINE_MAX_EPOCHS
    batch_size: int = defaults.REFINE_BATCH_SIZE
    stop_delta: float = defaults.REFINE_STOP_DELTA
    precision: Precision = "auto"
    eval_batch: int | None = None
    # sitefit's init-path learning rate: the product default (0, batch-norm statistics only)
    # or the paper's 1e-3; the reference loop is always the authors' self-training
    learning_rate: float = defaults.REFINE_LR
    # with learning rate 0: how the batch-norm running statistics follow the scan
    statistics_average: StatisticsAverage = defaults.REFINE_STATISTICS_AVERAGE


def run_method(
    method: str,
    net: SegmentationNet,
    slices: torch.Tensor,
    num_classes: int,
    settings: Settings,
    region: Region | None = None,
) -> MethodRun:
    """Adapt ``net`` to ``slices`` and segment them with ``method``: reference or sitefit.

    Masks are of ``region`` (``PreparedScan.region``) when given, as the engine's are; the
    reference loop, as the authors wrote it, still stops on the padded slices' figure.
    """
    device = slices.device
    rows, columns = region or (slice(None), slice(None))
    if method == "reference":
        ref = reference_refine(
            net,
            slices,
            num_classes,
            ReferenceConfig(
                max_epochs=settings.max_epochs,
                batch_size=settings.batch_size,
                stop_delta=settings.stop_delta,
            ),
        )
        final = ref.final[:, rows, columns]
        return MethodRun(method, ref.seconds, ref.epochs, ref.dice_trace, final)
    if method != "sitefit":
        raise ValueError(f"unknown method {method!r}")
    # What the engine does in mode "adapt" (worker/engine.py), without loading and figures.
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    base = predict(
        net,
        slices,
        settings.batch_size,
        precision=settings.precision,
        eval_batch=settings.eval_batch,
        region=region,
    )
    start_consistency = foreground_dice(base.early, base.final, num_classes)
    seconds["initial"] = time.perf_counter() - tick
    config = RefineConfig(
        max_epochs=settings.max_epochs,
        batch_size=settings.batch_size,
        stop_delta=settings.stop_delta,
        precision=settings.precision,
        eval_batch_size=settings.eval_batch,
        learning_rate=settings.learning_rate,
        statistics_average=settings.statistics_average,
    )
    guard = GuardConfig(
        True,
        defaults.GUARD_MAX_VOLUME_CHANGE,
        defaults.GUARD_MIN_AGREEMENT,
        min_consistency_gain=default_consistency_gain(settings.learning_rate),
    )
    result = refine(net, slices, num_classes, start_consistency, config, keep_states=True,
                    accept=acceptance(base, num_classes, guard), region=region)  # fmt: skip
    seconds["train"], seconds["evaluate"] = result.train_seconds, result.eval_seconds
    tick = time.perf_counter()
    verdict = judge(base, result.predictions, num_classes, guard, result.dice_trace)
    kept = verdict.kept_epoch
    if kept is not None:
        load_numpy(
            net, {k: v.cpu().numpy() for k, v in result.states[kept - 1].items()}, strict=False
        )
    guarded = result.predictions[kept - 1] if kept is not None else base
    sync(device)
    seconds["guard"] = time.perf_counter() - tick
    return MethodRun(
        method,
        seconds,
        result.epochs,
        result.dice_trace,
        result.prediction.final,
        {"guarded_final": guarded.final, "kept_epoch": kept, "base": base.final},
    )


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_up(net: SegmentationNet, slices: torch.Tensor, method: str, settings: Settings) -> None:
    """One tiny untimed run on a copy: library start-up (oneDNN primitives, CUDA context)."""
    import copy

    small = slices[: min(4, slices.shape[0])]
    tiny = Settings(1, 2, -1.0, settings.precision, None, settings.learning_rate)
    run_method(method, copy.deepcopy(net), small, 2, tiny)


def measured_run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--run METHOD`` entry point: one timed run, figures as a dict."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    volume = VOLUMES[args.volume]
    image_path, label_path = volume_files(volume, args.work)
    spec, tensors = model_weights(args.work, volume)
    classes = len(spec.classes)
    settings = Settings(
        args.max_epochs, args.batch_size, args.stop_delta, args.precision, None, args.refine_lr,
        args.statistics_average,
    )  # fmt: skip
    tick = time.perf_counter()
    scan = load_scan(image_path, defaults.MAX_VOXELS)
    prepared = prepare_scan(scan, spec.slice_axis, device)
    sync(device)
    prepare_s = time.perf_counter() - tick
    net = fresh_net(net_config(spec.architecture), tensors, device)
    warm_up(net, prepared.slices, args.run, settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    tick, cpu_tick = time.perf_counter(), time.process_time()
    run = run_method(args.run, net, prepared.slices, classes, settings, prepared.region)
    sync(device)
    total, cpu_total = time.perf_counter() - tick, time.process_time() - cpu_tick
    peak = (
        torch.cuda.max_memory_allocated(device) / 1024**2
        if device.type == "cuda"
        else peak_rss_mb()
    )
    cached = None
    if args.run == "sitefit":  # the cached-site path: one eval pass with given weights
        sync(device)
        tick = time.perf_counter()
        predict(net, prepared.slices, settings.batch_size, precision=settings.precision,
                region=prepared.region)  # fmt: skip
        sync(device)
        cached = time.perf_counter() - tick
    reference = load_label_map(label_path, like=scan)
    spacing = scan.spacing_mm

    def figures(labels: torch.Tensor) -> tuple[float, float]:
        mask = prepared.volume(labels) == 1
        truth = reference == 1
        return surface_dice(mask, truth, spacing, 1.0) or 0.0, volume_dice(mask, truth) or 0.0

    sdice, vdice = figures(run.final)
    out: dict[str, Any] = {
        "method": args.run,
        "volume": volume.name,
        "shape": list(volume.shape),
        "device": describe_device(device),
        "seconds": total,
        "cpu_seconds": cpu_total,
        "stages": run.seconds,
        "prepare_seconds": prepare_s,
        "epochs": run.epochs,
        "dice_trace": run.dice_trace,
        "peak_mb": peak,
        "peak_kind": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "VmHWM (process RSS)",
        "sdice": sdice,
        "dice": vdice,
        "slices": int(prepared.slices.shape[0]),
        "threads": torch.get_num_threads(),
    }
    if args.run == "sitefit":
        out["sdice_guarded"], _ = figures(run.extra["guarded_final"])
        out["sdice_base"], _ = figures(run.extra["base"])
        out["kept_epoch"] = run.extra["kept_epoch"]
        out["cached_segment_seconds"] = cached
    return out


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {cpu_model()})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------
# The comparison (parent process)


def spawn(method: str, volume: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run",
        method,
        "--volume",
        volume,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--work",
        str(args.work),
        "--max-epochs",
        str(args.max_epochs),
        "--batch-size",
        str(args.batch_size),
        "--stop-delta",
        str(args.stop_delta),
        "--precision",
        args.precision,
        "--refine-lr",
        repr(args.refine_lr),
        "--statistics-average",
        args.statistics_average,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"measured run {method} on {volume} failed ({done.returncode})")
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    return result


def alternating(methods: tuple[str, str], repeats: int) -> Iterator[str]:
    """A, B, B, A, A, B, ...: each method runs first and second equally often."""
    for r in range(repeats):
        yield from (methods if r % 2 == 0 else methods[::-1])


def compare(volume: str, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "sitefit": []}
    volume_files(VOLUMES[volume], args.work)  # made here, once, not in a measured run
    load_before = os.getloadavg()
    for method in alternating(("reference", "sitefit"), args.repeats):
        result = spawn(method, volume, args)
        runs[method].append(result)
        print(
            f"  [{volume}] {method:9s} {result['seconds']:8.2f} s  epochs {result['epochs']}"
            f"  sDice {result['sdice']:.4f}  peak {result['peak_mb']:.0f} MB",
            flush=True,
        )
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(r["cpu_seconds"] for r in rs) for m, rs in runs.items()}
    paired = [
        a["seconds"] / b["seconds"] for a, b in zip(runs["reference"], runs["sitefit"], strict=True)
    ]
    summary: dict[str, Any] = {
        "volume": volume,
        "shape": runs["sitefit"][0]["shape"],
        "device": runs["sitefit"][0]["device"],
        "repeats": args.repeats,
        "ratio_reference_over_sitefit": med["reference"] / med["sitefit"],
        "ratio_paired_median": statistics.median(paired),
        "ratio_cpu_seconds": cpu["reference"] / cpu["sitefit"],
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "max_epochs": args.max_epochs,
        "stop_delta": args.stop_delta,
        "precision": args.precision,
        "refine_lr": args.refine_lr,
        "statistics_average": args.statistics_average,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/adapt_speed.py " + " ".join(args.argv),
    }
    for method, rs in runs.items():
        summary[method] = {
            "seconds": med[method],
            "cpu_seconds": cpu[method],
            "runs": [round(r["seconds"], 3) for r in rs],
            "stages": {k: statistics.median(r["stages"][k] for r in rs) for k in rs[0]["stages"]},
            "prepare_seconds": statistics.median(r["prepare_seconds"] for r in rs),
            "epochs": [r["epochs"] for r in rs],
            "peak_mb": max(r["peak_mb"] for r in rs),
            "peak_kind": rs[0]["peak_kind"],
            "sdice": statistics.median(r["sdice"] for r in rs),
            "dice": statistics.median(r["dice"] for r in rs),
            "dice_trace": rs[0]["dice_trace"],
        }
    site = summary["sitefit"]
    for key in ("sdice_guarded", "sdice_base", "cached_segment_seconds"):
        site[key] = statistics.median(r[key] for r in runs["sitefit"])
    site["kept_epoch"] = [r["kept_epoch"] for r in runs["sitefit"]]
    return summary


def sweeps(args: argparse.Namespace) -> dict[str, Any]:
    """sitefit's time against the number of slices and the batch size (quick volume, 2 epochs).

    In-process and with a fixed number of epochs (``stop_delta`` < 0), so that only the cost
    per epoch is measured; median of ``--sweep-repeats``.
    """
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image_path, _ = volume_files(VOLUMES["quick"], args.work)
    spec, tensors = model_weights(args.work, VOLUMES["quick"])
    prepared = prepare_scan(load_scan(image_path, defaults.MAX_VOXELS), spec.slice_axis, device)
    slices, classes = prepared.slices, len(spec.classes)
    config = net_config(spec.architecture)
    epochs = 2

    def timed(n: int, batch: int) -> float:
        first = (slices.shape[0] - n) // 2
        part = slices[first : first + n]
        times = []
        for _ in range(args.sweep_repeats):
            net = fresh_net(config, tensors, device)
            settings = Settings(epochs, batch, -1.0, args.precision, None, args.refine_lr,
                                args.statistics_average)  # fmt: skip
            sync(device)
            tick = time.perf_counter()
            run_method("sitefit", net, part, classes, settings)
            sync(device)
            times.append(time.perf_counter() - tick)
        return statistics.median(times)

    warm_up(
        fresh_net(config, tensors, device),
        slices,
        "sitefit",
        Settings(
            precision=args.precision,
            learning_rate=args.refine_lr,
            statistics_average=args.statistics_average,
        ),
    )
    counts = [n for n in (24, 48, 96) if n <= slices.shape[0]]
    by_slices = {n: timed(n, args.batch_size) for n in counts}
    by_batch = {b: timed(slices.shape[0], b) for b in (10, 20, 40)}
    xs, ys = np.array(list(by_slices)), np.array(list(by_slices.values()))
    slope, intercept = np.polyfit(xs, ys, 1)
    fitted = slope * xs + intercept
    r2 = 1 - float(((ys - fitted) ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-12))
    return {
        "epochs": epochs,
        "in_plane": list(slices.shape[2:]),
        "by_slices": by_slices,
        "by_batch": by_batch,
        "seconds_per_slice": float(slope),
        "intercept_s": float(intercept),
        "r2": r2,
        "device": describe_device(device),
        "refine_lr": args.refine_lr,
        "statistics_average": args.statistics_average,
    }


# ---------------------------------------------------------------------------------------
# Quality of the fast path (fp32 vs bf16) and of the reference loop, on phantoms


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """One-shot adapt on ``--quality-subjects`` phantoms of every domain: sDice vs ground truth.

    sitefit with ``precision="fp32"`` (the original numerics) and with ``"auto"`` (the fast
    path), optionally the reference loop; same base model, FOV as in training.
    """
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec, tensors = model_weights(args.work, VOLUMES["quick"])
    config, classes = net_config(spec.architecture), len(spec.classes)
    methods = ["fp32", "auto"] + (["reference"] if args.quality_reference else [])
    rows: dict[str, dict[str, list[float]]] = {}
    for domain in DOMAINS:
        data = write_dataset(
            TASK,
            domain,
            args.quality_subjects,
            3000,
            args.work / "data" / f"quality-{domain}-{args.quality_subjects}",
            VOLUMES["quick"].train_fov_mm,
        )
        images = sorted((data / "imagesTr").glob("*_0000.nii.gz"))
        labels = sorted((data / "labelsTr").glob("*.nii.gz"))
        row: dict[str, list[float]] = {"base": []}
        for image, label in zip(images, labels, strict=True):
            scan = load_scan(image, defaults.MAX_VOXELS)
            truth = load_label_map(label, like=scan) == 1
            prepared = prepare_scan(scan, spec.slice_axis, device)
            for method in methods:
                net = fresh_net(config, tensors, device)
                precision: Precision = "fp32" if method == "fp32" else "auto"
                settings = Settings(
                    args.max_epochs,
                    args.batch_size,
                    args.stop_delta,
                    precision,
                    None,
                    args.refine_lr,
                    args.statistics_average,
                )
                tick = time.perf_counter()
                run = run_method(
                    "reference" if method == "reference" else "sitefit",
                    net,
                    prepared.slices,
                    classes,
                    settings,
                    prepared.region,
                )
                seconds = time.perf_counter() - tick
                masks = {method: run.final}
                if method != "reference":
                    masks[f"{method} guarded"] = run.extra["guarded_final"]
                    if method == "fp32":
                        masks["base"] = run.extra["base"]
                for key, labels_ in masks.items():
                    value = surface_dice(prepared.volume(labels_) == 1, truth, scan.spacing_mm, 1.0)
                    row.setdefault(key, []).append(value or 0.0)
                row.setdefault(f"{method} epochs", []).append(run.epochs)
                row.setdefault(f"{method} seconds", []).append(seconds)
            print(
                f"  [quality] {domain} {image.name}: "
                + ", ".join(f"{k} {v[-1]:.4f}" for k, v in row.items() if "seconds" not in k),
                flush=True,
            )
        rows[domain] = row
    return {
        "subjects": args.quality_subjects,
        "fov_mm": VOLUMES["quick"].train_fov_mm,
        "rows": rows,
        "device": describe_device(device),
        "methods": methods,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------
# Report


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu_model()}, {cores} cores visible, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def suffix(args: argparse.Namespace) -> str:
    """Of the results file and the docs section: none for the product's refinement."""
    if args.refine_lr != defaults.REFINE_LR:
        return f"-lr{args.refine_lr:g}"
    if args.statistics_average != defaults.REFINE_STATISTICS_AVERAGE:
        return f"-{args.statistics_average}"
    return ""


def results_file(args: argparse.Namespace) -> Path:
    work: Path = args.work
    return work / f"results{suffix(args)}.json"


def load_results(args: argparse.Namespace) -> dict[str, Any]:
    path = results_file(args)
    stored: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return stored


def store_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    path = results_file(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def variant(refine_lr: float, statistics_average: str) -> str:
    """sitefit's refinement in words, for the docs."""
    if refine_lr != 0:
        return f"the paper's init-path self-training at learning rate {refine_lr:g}"
    average = (
        "the plain mean of the refinement's batch statistics"
        if statistics_average == "cumulative"
        else "the authors' momentum average"
    )
    default = statistics_average == defaults.REFINE_STATISTICS_AVERAGE
    return f"batch-norm statistics only, learning rate 0, {average}" + (
        ", the product default" if default else ""
    )


def markdown(results: dict[str, Any], refine_lr: float, statistics_average: str) -> str:
    out = [
        f"sitefit's one-shot adapt+segment ({variant(refine_lr, statistics_average)}; "
        "what the engine runs in mode `adapt`: base pass, `refine` with kept states, guard) "
        "against the authors' loop re-implemented in `bench/reference_loop.py` (whole model "
        "in train mode, attached teacher from a full forward pass, init path computed twice, "
        "separate eval pass per epoch, separate segmentation pass), from the same base "
        "weights, same batches, same stopping rule. Each run is a fresh process; runs "
        "alternate between the methods; times are medians; *paired* is the median of the "
        "ratios of consecutive runs, *CPU-time* the ratio of the runs' process CPU time "
        "(user+sys, all threads): on a shared, oversubscribed machine wall time depends on "
        "what else runs, CPU time much less. Seconds exclude loading and scaling (the same "
        "for both, column *prep*). Peak memory: the run's process RSS (VmHWM) on CPU, "
        "`torch.cuda.max_memory_allocated` on GPU. sDice: surface Dice at 1 mm of the final "
        "mask vs the phantom's ground truth (sitefit: last epoch; *guarded*: the epoch the "
        "guard keeps, i.e. the engine's output).",
        "",
        "| volume | device | reference s | sitefit s | ratio (paired; CPU-time) "
        "| epochs ref / sitefit | stages ref (initial / train / evaluate / segment) "
        "| stages sitefit (base / train / "
        "evaluate / guard) | prep s | peak MB ref / sitefit | sDice ref / sitefit / guarded "
        "/ base | cached-path segment s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    entries = [v for k, v in sorted(results.items()) if k.startswith("compare:")]
    for e in entries:
        ref, site = e["reference"], e["sitefit"]
        rs, ss = ref["stages"], site["stages"]
        out.append(
            f"| {'x'.join(map(str, e['shape']))} | {e['device']} | {_f(ref['seconds'], 1)} | "
            f"{_f(site['seconds'], 1)} | **{_f(e['ratio_reference_over_sitefit'])}x** "
            f"({_f(e['ratio_paired_median'])}x; {_f(e.get('ratio_cpu_seconds', float('nan')))}x) "
            f"| {ref['epochs']} / {site['epochs']} | "
            f"{' / '.join(_f(rs[k], 1) for k in ('initial', 'train', 'evaluate', 'segment'))} | "
            f"{' / '.join(_f(ss[k], 1) for k in ('initial', 'train', 'evaluate', 'guard'))} | "
            f"{_f(site['prepare_seconds'], 1)} | {ref['peak_mb']:.0f} / {site['peak_mb']:.0f} | "
            f"{_f(ref['sdice'], 4)} / {_f(site['sdice'], 4)} / {_f(site['sdice_guarded'], 4)} / "
            f"{_f(site['sdice_base'], 4)} | {_f(site['cached_segment_seconds'], 2)} |"
        )
    out.append("")
    for e in entries:
        out.append(
            f"- {'x'.join(map(str, e['shape']))} on {e['device']}: `{e['command']}`, "
            f"{e['repeats']} runs each, {e['date']}, load average before/after "
            f"{e['load_average']}, OMP_WAIT_POLICY {e.get('omp_wait_policy', 'default')}, "
            f"at most {e.get('max_epochs')} epochs, stop at |ΔDice| < {e.get('stop_delta')} "
            f"(negative: never), precision {e.get('precision')}; "
            f"run times reference {e['reference']['runs']}, sitefit {e['sitefit']['runs']}."
        )
    sweep = results.get("sweep")
    if sweep:
        size = "x".join(map(str, sweep["in_plane"]))
        work = (
            "the statistics path: its passes, and its points evaluated until the guard accepts"
            if sweep.get("refine_lr", 0) == 0
            and sweep.get("statistics_average", "momentum") == "cumulative"
            else f"{sweep['epochs']} epochs fixed"
        )
        out += [
            "",
            f"Scaling (sitefit, {size} slices, {work}, "
            f"{sweep['device']}): time against the number of slices "
            + ", ".join(f"{n}: {_f(s, 1)} s" for n, s in sweep["by_slices"].items())
            + f" — linear fit {_f(sweep['seconds_per_slice'], 3)} s per slice + "
            f"{_f(sweep['intercept_s'], 1)} s, R² {_f(sweep['r2'], 3)}; against the training "
            "batch size (all slices) "
            + ", ".join(f"{b}: {_f(s, 1)} s" for b, s in sweep["by_batch"].items())
            + ". The batch size of training steps is part of the method (BN batch statistics, "
            "steps per epoch), so only the eval passes are batched freely.",
        ]
    q = results.get("quality")
    if q:
        out += [
            "",
            f"Quality of the fast path ({q['subjects']} phantoms per domain, {q['fov_mm']:g} mm "
            f"FOV, {q['device']}, {q['date']}): mean surface Dice at 1 mm vs ground truth after "
            "one-shot refinement. *fp32*: the original numerics (bitwise as before the fast "
            "path); *auto*: the fast path (bf16 autocast, channels_last, large eval batches).",
            "",
            "| domain | base | "
            + " | ".join(
                f"{m} (last) | {m} guarded" if m != "reference" else "reference"
                for m in q["methods"]
            )
            + " | epochs "
            + " / ".join(q["methods"])
            + " |",
            "|---|---|"
            + "---|---|" * sum(m != "reference" for m in q["methods"])
            + "---|" * sum(m == "reference" for m in q["methods"])
            + "---|",
        ]
        for domain, row in q["rows"].items():
            cells = [domain, _f(statistics.mean(row["base"]), 4)]
            for m in q["methods"]:
                cells.append(_f(statistics.mean(row[m]), 4))
                if m != "reference":
                    cells.append(_f(statistics.mean(row[f"{m} guarded"]), 4))
            epochs = " / ".join(_f(statistics.mean(row[f"{m} epochs"]), 1) for m in q["methods"])
            out.append("| " + " | ".join([*cells, epochs]) + " |")
    if not any(e["device"].startswith("cuda") for e in entries):
        out += [
            "",
            "GPU (CUDA): not measured in this session (no GPU was available). The CUDA path "
            "(bf16 autocast, channels_last, `cudnn.benchmark`, whole-volume eval batches within "
            "half the free memory, pinned host memory, one host sync per pass) shares its code "
            "with the CPU fast path; run `python bench/adapt_speed.py --device cuda` on a GPU "
            "machine for its figures (adapt+segment and the cached-path segmentation time).",
        ]
    out += ["", f"Machine: {machine()}."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="only the 96^3 volume")
    parser.add_argument("--skip-quick", action="store_true", help="only the 256x256x176 volume")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per method")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["auto", "passive", "inherit"],
        default="auto",
        help="auto: OMP_WAIT_POLICY=PASSIVE when the machine is oversubscribed (load average "
        "above the visible cores), where spinning OpenMP threads wait for descheduled ones",
    )
    parser.add_argument("--max-epochs", type=int, default=defaults.REFINE_MAX_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=defaults.REFINE_BATCH_SIZE)
    parser.add_argument("--stop-delta", type=float, default=defaults.REFINE_STOP_DELTA)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--refine-lr",
        type=float,
        default=defaults.REFINE_LR,
        help="sitefit's init-path learning rate (default: the product's, 0 = batch-norm "
        f"statistics only; {defaults.PAPER_REFINE_LR:g} = the paper's self-training)",
    )
    parser.add_argument(
        "--statistics-average",
        choices=["cumulative", "momentum"],
        default=defaults.REFINE_STATISTICS_AVERAGE,
        help="with --refine-lr 0: how sitefit's batch-norm running statistics follow the scan",
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the scaling sweeps")
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--quality", action="store_true", help="only the quality comparison")
    parser.add_argument("--quality-subjects", type=int, default=2)
    parser.add_argument("--quality-reference", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--train-subjects", type=int, default=4)
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--train-head-epochs", type=int, default=2)
    parser.add_argument("--run", choices=["reference", "sitefit"], help=argparse.SUPPRESS)
    parser.add_argument("--volume", choices=list(VOLUMES), default="quick", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if argv is None and not args.run:
        reexec_with_wait_policy(args.omp_wait_policy)

    if args.run:  # a measured run, in its own process
        print(MARKER + json.dumps(measured_run(args), default=float), flush=True)
        return 0

    torch.set_num_threads(args.threads)
    names = ["quick"] if args.quick else ["full"] if args.skip_quick else ["full", "quick"]
    # the sweeps and --quality use the quick volume's model
    needs_quick = args.quality or not args.no_sweep
    for name in sorted({*names, "quick"} if needs_quick else set(names)):
        base_model(args, VOLUMES[name])
    results = load_results(args)
    summary: dict[str, Any] = {}
    if args.quality:
        results["quality"] = quality(args)
    else:
        for name in names:
            print(f"volume {name}: {args.repeats} runs per method, alternating", flush=True)
            entry = compare(name, args)
            results[f"compare:{entry['device'].split(' ')[0]}:{name}"] = entry
            summary.setdefault("by_volume", {})[name] = headline(entry)
            store_results(args, results)
        if not args.no_sweep:
            results["sweep"] = sweeps(args)
    store_results(args, results)
    text = markdown(results, args.refine_lr, args.statistics_average)
    print(text)
    if not args.no_docs:
        if args.refine_lr != 0:
            title = f"Refinement speed: sitefit (the paper's self-training, lr {args.refine_lr:g})"
        elif args.statistics_average == defaults.REFINE_STATISTICS_AVERAGE:
            title = "Refinement speed: sitefit (the product default, batch-norm statistics)"
        else:
            title = f"Refinement speed: sitefit (batch-norm statistics, {args.statistics_average})"
        replace_section(
            args.out, f"adapt_speed{suffix(args)}", f"{title} vs the authors' loop", text
        )
        print(f"wrote {args.out}")
    if args.quality:
        summary = {"quality": results["quality"]["rows"]}
    else:
        main_volume = "quick" if args.quick else "full"
        summary = {
            **summary["by_volume"][main_volume],
            "volume": main_volume,
            "by_volume": summary["by_volume"],
        }
    print(json.dumps(summary, default=float))
    return 0


def reexec_with_wait_policy(policy: str) -> None:
    """Restart this process with ``OMP_WAIT_POLICY=PASSIVE`` when asked or oversubscribed.

    OpenMP reads the variable at start-up, hence the re-exec; the measured runs inherit it.
    On this project's shared 2-core machine (load average 10-15) a 2-thread training step
    measured 8x slower with the default (spinning) policy than with PASSIVE: each parallel
    region's barrier waits for a thread the kernel has descheduled. On an idle machine the
    policy makes no difference worth measuring, so ``auto`` leaves it alone there.
    """
    if policy == "inherit" or os.environ.get("OMP_WAIT_POLICY"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if policy == "passive" or os.getloadavg()[0] > (cores or 1):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        sys.stdout.flush()
        os.execve(
            sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env
        )


def headline(entry: dict[str, Any]) -> dict[str, Any]:
    ref, site = entry["reference"], entry["sitefit"]
    return {
        "ratio_reference_over_sitefit": round(entry["ratio_reference_over_sitefit"], 3),
        "ratio_paired_median": round(entry["ratio_paired_median"], 3),
        "ratio_cpu_seconds": round(entry["ratio_cpu_seconds"], 3),
        "sdice_reference": round(ref["sdice"], 4),
        "sdice_sitefit": round(site["sdice"], 4),
        "sdice_sitefit_guarded": round(site["sdice_guarded"], 4),
        "seconds_reference": round(ref["seconds"], 3),
        "seconds_sitefit": round(site["seconds"], 3),
        "epochs_reference": ref["epochs"],
        "epochs_sitefit": site["epochs"],
        "peak_mb_reference": round(ref["peak_mb"], 1),
        "peak_mb_sitefit": round(site["peak_mb"], 1),
        "cached_segment_seconds": round(site["cached_segment_seconds"], 3),
        "device": entry["device"],
        "shape": entry["shape"],
    }


if __name__ == "__main__":
    sys.exit(main())
