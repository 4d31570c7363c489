"""Calibrate the adaptation guard (worker/guard.py) on the scanner phantoms, and prove it.

One unguarded one-shot refinement per scan gives everything: after every epoch the guard's
signals (``worker.guard.epoch_signals``, the BN shift) and the true surface Dice (1 mm, 3D at
the scan's spacing, mean over foreground classes) of that epoch's final mask. These records
are saved as JSON (``var/guard/records``), one file per scan, and reused on re-runs. The
guard's decision (``worker.guard.decide``, the code ``judge`` runs in the engine) is then
replayed offline on the records for any thresholds:

- ``collect``: refine every scan of every task x domain, for the calibration and the
  held-out phantom seeds, and write the records;
- ``calibrate``: sweep the thresholds on the calibration seeds, pick the defaults, report the
  held-out figures (base, unguarded, guarded surface Dice; signals vs true change; the
  confusion matrix) and write them to ``docs/benchmarks.md`` (section ``guard_calibration``);
- ``verify``: run a few held-out scans through the real ``Engine`` (guard on, the defaults of
  ``sitefit/defaults.py``) and check it keeps the epoch the offline replay keeps;
- ``steps``: on the tissue task, refine with other step rules (SGD, lower Adam learning rate)
  and compare the last, the guard's and the best (oracle) epoch.

Usage (2 CPU cores, shared; each step reuses what the previous ones wrote)::

    python bench/guard_calibration.py collect
    python bench/guard_calibration.py calibrate
    python bench/guard_calibration.py verify
    python bench/guard_calibration.py steps
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report_file import replace_section  # noqa: E402
from model_store import ModelStore  # noqa: E402
from model_store.backend import FilesystemBackend  # noqa: E402
from model_store.base_models import BaseModelRegistry  # noqa: E402
from model_store.spec import ModelSpec  # noqa: E402
from sitefit import defaults  # noqa: E402
from sitefit.exceptions import ModelNotFoundError  # noqa: E402
from sitefit.metrics import overlap_per_class  # noqa: E402
from sitefit.phantoms import DOMAINS, write_dataset  # noqa: E402
from sitefit.settings import Settings  # noqa: E402
from sitefit.volume import load_label_map, load_scan  # noqa: E402
from worker.engine import Engine, SegmentRequest  # noqa: E402
from worker.guard import (  # noqa: E402
    EpochSignals,
    GuardConfig,
    StartSignals,
    bn_shift,
    decide,
    epoch_signals,
)
from worker.inference import execution_for, foreground_dice, predict  # noqa: E402
from worker.preprocess import prepare_scan  # noqa: E402
from worker.refinement import RefineConfig, refine  # noqa: E402
from worker.training import TrainConfig, train_base_model  # noqa: E402
from worker.weights import build_net, mutable_state  # noqa: E402

TASKS = ("brain", "heart", "tissue")
HARM_TASK = "tissue"
CALIBRATION_SEED, HELD_OUT_SEED = 3000, 4000  # phantom seeds (training: 0; adapt_quality: 1000+)
HELPFUL, HARMFUL = 0.01, -0.01  # true change of surface Dice that counts as help / harm
MAX_HARM = 0.01  # (a): on the harm task no domain's guarded mean may fall more below base
MIN_GAIN_KEPT = 0.9  # (b): brain and heart keep at least this share of the unguarded gain
WORK = ROOT / "var" / "guard"
# what a record's figures mean; records of another format are collected again and never
# calibrated on. 2: the guard's signals count the scan's own pixels, not the in-plane padding
RECORD_FORMAT = 2
SHARED_MODELS = ROOT / "var" / "bench1" / "home" / "models"  # adapt_quality's, read-only


# --- base models ------------------------------------------------------------------------------


def _matches(spec: ModelSpec, args: argparse.Namespace) -> bool:
    """Same U-Net training as asked (epochs, subjects); the early head's may differ (its owner
    may register a re-trained head as a new version)."""
    training = spec.training
    n = len(training.train_cases) + len(training.validation_cases)
    return (training.epochs, n) == (args.epochs, args.n_train)


def find_model(task: str, args: argparse.Namespace) -> tuple[Path, ModelSpec] | None:
    """The newest matching ``bench-TASK`` and its store's directory: the shared store
    (read-only) first, then ours."""
    name = f"bench-{task}"
    for root in (args.shared_models, args.work / "home" / "models"):
        if not root.is_dir():
            continue
        registry = BaseModelRegistry(root)
        for version in sorted(registry.versions(name), reverse=True):
            try:
                spec = registry.spec(f"{name}@{version}")
            except ModelNotFoundError:
                continue
            if _matches(spec, args):
                return root, spec
    return None


def model_for(task: str, args: argparse.Namespace) -> tuple[Path, ModelSpec]:
    """``find_model``'s, or one trained into our store with adapt_quality's settings."""
    found = find_model(task, args)
    if found is not None:
        return found
    name = f"bench-{task}"
    own_root = args.work / "home" / "models"
    source = next(n for n, d in DOMAINS.items() if d.role == "source")
    data = write_dataset(
        task, source, args.n_train, 0, args.work / "data" / f"{task}-{source}-train", args.fov_mm
    )
    print(f"[{task}] training {name} on {args.n_train} {source} subjects", flush=True)
    config = TrainConfig(epochs=args.epochs, head_epochs=args.head_epochs, seed=0)
    spec = train_base_model(
        data,
        name,
        config,
        BaseModelRegistry(own_root),
        torch.device("cpu"),
        log=lambda line: print(f"[{task}]   {line}", flush=True),
    )
    return own_root, spec


# --- one scan: an unguarded refinement, every epoch's signals and true figures ----------------


def case_paths(task: str, domain: str, seed: int, n: int, args: argparse.Namespace) -> list[Path]:
    out = write_dataset(
        task, domain, n, seed, args.work / "data" / f"{task}-{domain}-{seed}-{n}", args.fov_mm
    )
    return sorted((out / "imagesTr").glob("*_0000.nii.gz"))


def label_of(image: Path) -> Path:
    return image.parent.parent / "labelsTr" / image.name.replace("_0000.nii.gz", ".nii.gz")


def true_figures(
    spec: ModelSpec, labels: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> dict[str, Any]:
    """Mean surface Dice (1 mm) and Dice over foreground classes, and the per-class figures."""
    foreground = {k: v for k, v in spec.classes.items() if k}
    figures = overlap_per_class(labels, reference, foreground, spacing, 1.0)
    sd = [f["surface_dice"] for f in figures.values() if f["surface_dice"] is not None]
    di = [f["dice"] for f in figures.values() if f["dice"] is not None]
    return {
        "sdice": float(np.mean(sd)) if sd else 0.0,
        "dice": float(np.mean(di)) if di else 0.0,
        "per_class_sdice": {k: f["surface_dice"] for k, f in figures.items()},
    }


def volumes(labels: torch.Tensor, num_classes: int) -> list[int]:
    counts = torch.bincount(labels.flatten().long(), minlength=max(num_classes, 2))
    return [int(c) for c in counts[1:]]


def signals_record(signals: EpochSignals) -> dict[str, Any]:
    record = dataclasses.asdict(signals)
    record["volume_change"] = {str(k): v for k, v in signals.volume_change.items()}
    return record


def signals_from(record: dict[str, Any]) -> EpochSignals:
    names = {f.name for f in dataclasses.fields(EpochSignals)}
    values = {k: v for k, v in record.items() if k in names}
    values["volume_change"] = {int(k): v for k, v in record["volume_change"].items()}
    return EpochSignals(**values)


@contextlib.contextmanager
def step_rule(rule: str) -> Iterator[None]:
    """Swap the optimiser refinement.py builds (``torch.optim.Adam``) for the duration.

    ``adam``: unchanged. ``sgd``: SGD with momentum 0.9 at the configured learning rate. The
    loop, the loss and the stopping rule stay those of ``worker.refinement.refine``.
    """
    if rule == "adam":
        yield
        return
    if rule != "sgd":
        raise ValueError(f"unknown step rule {rule!r}")

    def sgd(params: Any, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    with mock.patch("worker.refinement.torch.optim.Adam", sgd):
        yield


def refine_scan(
    spec: ModelSpec,
    tensors: dict[str, np.ndarray],
    image: Path,
    config: RefineConfig,
    rule: str = "adam",
) -> dict[str, Any]:
    """The record of one unguarded one-shot refinement of ``image``."""
    scan = load_scan(image, defaults.MAX_VOXELS)
    reference = load_label_map(label_of(image), like=scan)
    prepared = prepare_scan(scan, spec.slice_axis, torch.device("cpu"))
    classes = len(spec.classes)
    net = build_net(spec, tensors, torch.device("cpu"))
    base = predict(net, prepared.slices, config.batch_size, precision=config.precision,
                   region=prepared.region)  # fmt: skip
    start_state = mutable_state(net)
    start_consistency = foreground_dice(base.early, base.final, classes)
    tick = time.perf_counter()
    with step_rule(rule):
        result = refine(net, prepared.slices, classes, start_consistency, config, keep_states=True,
                        region=prepared.region)  # fmt: skip
    seconds = time.perf_counter() - tick
    spacing = scan.spacing_mm
    epochs = []
    for number, (prediction, state) in enumerate(
        zip(result.predictions, result.states, strict=True), start=1
    ):
        signals = epoch_signals(number, base, prediction, classes)
        epochs.append(
            {
                "signals": signals_record(signals),
                "bn_shift": bn_shift(start_state, state),
                "volumes": volumes(prediction.final, classes),
                "early_volumes": volumes(prediction.early, classes),
                "early_agreement": foreground_dice(base.early, prediction.early, classes),
                **true_figures(spec, prepared.volume(prediction.final), reference, spacing),
            }
        )
    return {
        "case": image.name.replace("_0000.nii.gz", ""),
        "format": RECORD_FORMAT,
        "model": spec.ref,
        "spacing_mm": list(spacing),
        "start_consistency": start_consistency,
        "start_entropy": base.mean_entropy,
        "start_volumes": volumes(base.final, classes),
        "start_early_volumes": volumes(base.early, classes),
        "base": true_figures(spec, prepared.volume(base.final), reference, spacing),
        "trace": result.dice_trace,
        "path_points": result.path_points,  # with the statistics path: each epoch's point
        "stopped": result.stopped,
        "seconds": round(seconds, 2),
        "refine": {"rule": rule, "lr": config.learning_rate, "batchnorm": config.batchnorm},
        "numerics": numerics(config.precision),
        "epochs": epochs,
    }


def numerics(precision: str) -> str:
    """What ``precision`` runs as on this machine's CPU: ``"bf16"`` or ``"fp32"``."""
    execution = execution_for(torch.device("cpu"), precision)  # type: ignore[arg-type]
    return "fp32" if execution.exact else "bf16"


def record_path(
    args: argparse.Namespace,
    task: str,
    domain: str,
    seed: int,
    index: int,
    kind: str = "",
    folder: str | None = None,
) -> Path:
    """Where a record goes: one folder per numerics and learning rate (``records/fp32``,
    ``records/fp32-lr0``; ``folder``, default ``args.folder``)."""
    name = f"{task}-{domain}-{seed}-{kind}{index:02d}.json"
    return args.work / "records" / (folder or args.folder) / name


def collect(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    # the product's refinement defaults (BN train), at the asked numerics
    config = RefineConfig(precision=args.precision, learning_rate=args.lr)
    sizes = {CALIBRATION_SEED: args.n_calibration, HELD_OUT_SEED: args.n_held_out}
    for task in args.tasks:
        root, spec = model_for(task, args)
        tensors = BaseModelRegistry(root).tensors(spec)
        for seed in args.seeds:
            n = sizes[seed]
            for domain in args.domains:
                for index, image in enumerate(case_paths(task, domain, seed, n, args)):
                    path = record_path(args, task, domain, seed, index)
                    model = spec.ref
                    if path.exists() and current(json.loads(path.read_text()), model, args.lr):
                        continue
                    record = refine_scan(spec, tensors, image, config)
                    record.update(
                        task=task, domain=domain, role=DOMAINS[domain].role, seed=seed, index=index
                    )
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record, indent=1))
                    last = record["epochs"][-1]
                    print(
                        f"[{task}] {domain:5s} seed {seed} #{index}: base "
                        f"{record['base']['sdice']:.3f} -> {last['sdice']:.3f} after "
                        f"{len(record['epochs'])} epochs ({record['seconds']:.0f} s)",
                        flush=True,
                    )


# --- offline replay -------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    record: dict[str, Any]
    kept: int | None  # 1-based epoch, None: reverted
    reason: str
    passing: tuple[int, ...] = ()  # 1-based epochs that pass every check

    @property
    def base(self) -> float:
        return float(self.record["base"]["sdice"])

    @property
    def unguarded(self) -> float:
        return float(self.record["epochs"][-1]["sdice"])

    @property
    def guarded(self) -> float:
        return (
            self.base if self.kept is None else float(self.record["epochs"][self.kept - 1]["sdice"])
        )

    @property
    def delta(self) -> float:
        """True change of surface Dice of the unguarded refinement (what the guard judges)."""
        return self.unguarded - self.base


def replay(record: dict[str, Any], config: GuardConfig) -> Replay:
    per_epoch = [signals_from(e["signals"]) for e in record["epochs"]]
    start = StartSignals(record["start_consistency"], record["start_entropy"])
    kept, reason, problems = decide(start, per_epoch, config)
    return Replay(record, kept, reason, tuple(e for e, p in problems.items() if not p))


def load_records(args: argparse.Namespace, seed: int, kind: str) -> list[dict[str, Any]]:
    """The records of ``seed`` at numerics ``kind`` made with each task's current model."""
    models = {}
    for task in args.tasks:
        found = find_model(task, args)
        if found is not None:
            models[task] = f"{found[1].name}@{found[1].version}"
    folder = args.work / "records" / kind
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [r for r in records if r["seed"] == seed and current(r, models.get(r["task"]), args.lr)]


def current(record: dict[str, Any], model: str | None, lr: float) -> bool:
    """Whether ``record`` was made with ``model``, learning rate ``lr`` and in this code's
    ``RECORD_FORMAT``."""
    return (
        record.get("format") == RECORD_FORMAT
        and record["model"] == model
        and record["refine"]["lr"] == lr
    )


def head_epochs(args: argparse.Namespace) -> str:
    """The early heads' training epochs of the models calibrated on, e.g. "6 (heart: 20)"."""
    epochs = {}
    for task in args.tasks:
        found = find_model(task, args)
        epochs[task] = found[1].training.head_epochs if found else args.head_epochs
    values = list(epochs.values())
    common = max(set(values), key=values.count)
    others = ", ".join(f"{task}: {n}" for task, n in epochs.items() if n != common)
    return f"{common} ({others})" if others else str(common)


def by_cell(replays: list[Replay]) -> dict[tuple[str, str], list[Replay]]:
    cells: dict[tuple[str, str], list[Replay]] = {}
    for r in replays:
        cells.setdefault((r.record["task"], r.record["domain"]), []).append(r)
    return cells


def mean(values: Sequence[float]) -> float:
    return float(statistics.mean(values)) if values else float("nan")


def criteria(replays: list[Replay]) -> tuple[bool, bool, dict[str, float]]:
    """(a) harm task: no domain's guarded mean more than MAX_HARM below base;
    (b) other tasks: guarded gain >= MIN_GAIN_KEPT x unguarded gain (summed over domains
    where refinement helps on average), per task."""
    cells = by_cell(replays)
    worst_harm = min(
        (
            mean([r.guarded for r in rs]) - mean([r.base for r in rs])
            for (task, _), rs in cells.items()
            if task == HARM_TASK
        ),
        default=0.0,
    )
    kept_share: dict[str, float] = {}
    for task in sorted({t for t, _ in cells} - {HARM_TASK}):
        rs = [r for (t, _), group in cells.items() if t == task for r in group]
        gain = sum(r.unguarded - r.base for r in rs)
        kept = sum(r.guarded - r.base for r in rs)
        kept_share[task] = kept / gain if gain > 0 else 1.0
    ok_a = worst_harm >= -MAX_HARM
    ok_b = all(v >= MIN_GAIN_KEPT for v in kept_share.values())
    return ok_a, ok_b, {"worst_harm": worst_harm, **kept_share}


# --- calibration ------------------------------------------------------------------------------

INF = float("inf")
GRID: dict[str, Sequence[float]] = {
    "min_agreement": (0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
    "max_volume_change": (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, INF),
    "min_consistency_gain": (-INF, -0.05, 0.0, 0.02, 0.05),
    "max_entropy_rise": (0.1, 0.2, 0.3, 0.5, INF),
}


# a setting, whether it meets (a), whether it meets (b), its figures, its score
Row = tuple[GuardConfig, bool, bool, dict[str, float], float]


def configs(grid: dict[str, Sequence[float]]) -> Iterator[GuardConfig]:
    base = GuardConfig(enabled=True, max_volume_change=INF, min_agreement=0.0)
    for values in itertools.product(*grid.values()):
        yield dataclasses.replace(base, **dict(zip(grid, values, strict=True)))


def score(replays: list[Replay]) -> float:
    """What the selection maximises among configs meeting (a) and (b): mean guarded surface
    Dice over every scan, each task x domain cell weighted equally."""
    return mean([mean([r.guarded for r in rs]) for rs in by_cell(replays).values()])


def sweep(records: list[dict[str, Any]], grid: dict[str, Sequence[float]]) -> list[Row]:
    rows = []
    for config in configs(grid):
        replays = [replay(r, config) for r in records]
        ok_a, ok_b, figures = criteria(replays)
        rows.append((config, ok_a, ok_b, figures, score(replays)))
    return rows


def chosen(rows: list[Row]) -> GuardConfig:
    """A passing setting that is not on a cliff, explained in the report.

    Among the settings meeting (a) and (b), ranked by, in order:
    1. the share of its neighbours (one grid step away in one threshold) meeting (a):
       loosening any one threshold by a step still does no harm on the calibration seeds;
    2. the own score;
    3. the margins: along each threshold, the grid steps to the nearest setting in either
       direction that scores lower or fails (a) or (b) (the end of the grid counts as one
       step beyond it), compared smallest first. This puts each threshold in the middle of
       its plateau, away from the edge where the calibration seeds happen to stop;
    4. the neighbours' mean score.
    When nothing passes: the best score among settings meeting (a), with a warning.
    """
    index = {tuple(GRID[name].index(getattr(row[0], name)) for name in GRID): row for row in rows}

    def good(row: Row, than: Row) -> bool:
        return row[1] and row[2] and round(row[4], 4) >= round(than[4], 4)

    def margins(key: tuple[int, ...]) -> tuple[int, ...]:
        row = index[key]
        per_axis = []
        for axis in range(len(key)):
            steps = []
            for direction in (-1, 1):
                step = 1
                while True:
                    other = (*key[:axis], key[axis] + direction * step, *key[axis + 1 :])
                    if other not in index or not good(index[other], row):
                        steps.append(step)
                        break
                    step += 1
            per_axis.append(min(steps))
        return tuple(sorted(per_axis))

    def neighbours(key: tuple[int, ...]) -> list[Row]:
        found = []
        for axis in range(len(key)):
            for step in (-1, 1):
                other = (*key[:axis], key[axis] + step, *key[axis + 1 :])
                if other in index:
                    found.append(index[other])
        return found

    ranked = []
    for key, row in index.items():
        if row[1] and row[2]:
            near = neighbours(key)
            ranked.append(
                (
                    round(sum(r[1] for r in near) / len(near), 4),
                    round(row[4], 4),
                    margins(key),
                    round(mean([r[4] for r in near]), 4),
                    row,
                )
            )
    if ranked:
        return max(ranked, key=lambda item: item[:4])[4][0]
    print("WARNING: no threshold setting meets (a) and (b) on the calibration seeds")
    fallback = [row for row in rows if row[1]] or rows
    return max(fallback, key=lambda row: row[4])[0]


def product_config(args: argparse.Namespace) -> GuardConfig:
    """The guard as the product runs it: the Settings defaults through Engine.guard_config()."""
    home = args.work / "home"
    engine = Engine(Settings(home=home, device="cpu", refine_lr=args.lr), ModelStore(home))
    return engine.guard_config()


# --- the report -------------------------------------------------------------------------------


def outcome(delta: float) -> str:
    return "helpful" if delta > HELPFUL else "harmful" if delta < HARMFUL else "neutral"


def decision(r: Replay) -> str:
    if r.kept is None:
        return "reverted"
    return "kept (last epoch)" if r.kept == len(r.record["epochs"]) else "kept (earlier epoch)"


def fmt(value: float, digits: int = 3) -> str:
    return "–" if value != value else f"{value:.{digits}f}"  # nan -> dash


def signal_row(r: Replay) -> dict[str, float]:
    """The guard's signals of the last (unguarded) epoch, and the trace's shape."""
    last = r.record["epochs"][-1]
    sig = last["signals"]
    trace = [r.record["start_consistency"], *r.record["trace"]]
    steps_ = [b - a for a, b in itertools.pairwise(trace)]
    return {
        "start_consistency": r.record["start_consistency"],
        "self_consistency": sig["self_consistency"],
        "agreement": sig["agreement"],
        "min_agreement": min(e["signals"]["agreement"] for e in r.record["epochs"]),
        "volume_change": max(sig["volume_change"].values(), default=0.0),
        "entropy_before": r.record["start_entropy"],
        "entropy_after": sig["entropy"],
        "bn_shift": last["bn_shift"],
        "largest_fall": max([0.0] + [-x for x in steps_]),
        "epochs": float(len(r.record["epochs"])),
    }


SIGNAL_COLUMNS = (
    ("start_consistency", "self-cons. start"),
    ("self_consistency", "self-cons. last"),
    ("agreement", "agreement start vs last"),
    ("volume_change", "max class volume change"),
    ("entropy_before", "entropy before"),
    ("entropy_after", "entropy after"),
    ("bn_shift", "BN shift"),
    ("largest_fall", "largest fall of trace"),
    ("epochs", "epochs"),
)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return float("nan")
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def cell_table(replays: list[Replay]) -> list[str]:
    out = [
        "| task | domain | role | n | base sDice | unguarded one-shot | guarded one-shot | "
        "kept last / kept earlier / reverted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (task, domain), rs in by_cell(replays).items():
        base, raw, guarded = (
            mean([r.base for r in rs]),
            mean([r.unguarded for r in rs]),
            mean([r.guarded for r in rs]),
        )
        counts = [
            sum(decision(r) == d for r in rs)
            for d in ("kept (last epoch)", "kept (earlier epoch)", "reverted")
        ]
        out.append(
            f"| {task} | {domain} | {rs[0].record['role']} | {len(rs)} | {base:.3f} | "
            f"{raw:.3f} ({raw - base:+.3f}) | {guarded:.3f} ({guarded - base:+.3f}) | "
            f"{' / '.join(map(str, counts))} |"
        )
    return out


def must_hold(replays: list[Replay]) -> list[str]:
    cells = by_cell(replays)
    lines = []
    harm = {
        d: mean([r.guarded for r in rs]) - mean([r.base for r in rs])
        for (t, d), rs in cells.items()
        if t == HARM_TASK
    }
    raw = {
        d: mean([r.unguarded for r in rs]) - mean([r.base for r in rs])
        for (t, d), rs in cells.items()
        if t == HARM_TASK
    }
    if harm:
        worst = min(harm, key=lambda d: harm[d])
        ok = harm[worst] >= -MAX_HARM
        lines.append(
            f"{HARM_TASK}, guarded: worst domain {worst} {harm[worst]:+.3f} vs base (need >= "
            f"-{MAX_HARM}): {'PASS' if ok else 'FAIL'}; unguarded: "
            + ", ".join(f"{d} {v:+.3f}" for d, v in raw.items())
        )
    _, _, figures = criteria(replays)
    for task in sorted({t for t, _ in cells} - {HARM_TASK}):
        rs = [r for (t, _), group in cells.items() if t == task for r in group]
        gain = mean([r.unguarded - r.base for r in rs])
        kept = mean([r.guarded - r.base for r in rs])
        ok = figures[task] >= MIN_GAIN_KEPT
        lines.append(
            f"{task}: guarded gain {kept:+.3f} of unguarded {gain:+.3f} (mean over all domains) = "
            f"{figures[task]:.0%} (need >= {MIN_GAIN_KEPT:.0%}): {'PASS' if ok else 'FAIL'}"
        )
    return lines


def signals_tables(replays: list[Replay]) -> list[str]:
    out = [
        "Mean of each signal (last, unguarded epoch) by true outcome of the unguarded refinement "
        f"(helpful: Δ sDice > +{HELPFUL}, harmful: Δ < {HARMFUL}, neutral otherwise); last "
        "column group: Spearman correlation of the signal with Δ over all held-out scans.",
        "",
        "| task | outcome | n | mean Δ sDice | "
        + " | ".join(title for _, title in SIGNAL_COLUMNS)
        + " |",
        "|---|---|---|---|" + "---|" * len(SIGNAL_COLUMNS),
    ]
    tasks = sorted({r.record["task"] for r in replays}, key=TASKS.index)
    for task in tasks:
        for kind in ("helpful", "neutral", "harmful"):
            rs = [r for r in replays if r.record["task"] == task and outcome(r.delta) == kind]
            if not rs:
                continue
            rows = [signal_row(r) for r in rs]
            out.append(
                f"| {task} | {kind} | {len(rs)} | {mean([r.delta for r in rs]):+.3f} | "
                + " | ".join(fmt(mean([row[k] for row in rows])) for k, _ in SIGNAL_COLUMNS)
                + " |"
            )
    rows = [signal_row(r) for r in replays]
    deltas = [r.delta for r in replays]
    out.append(
        f"| all | Spearman ρ with Δ | {len(replays)} | | "
        + " | ".join(fmt(spearman([row[k] for row in rows], deltas), 2) for k, _ in SIGNAL_COLUMNS)
        + " |"
    )
    out += [
        "",
        "<details><summary>Per held-out scan</summary>",
        "",
        "| case | base | unguarded Δ | guarded Δ | decision | "
        + " | ".join(title for _, title in SIGNAL_COLUMNS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(SIGNAL_COLUMNS),
    ]
    for r in replays:
        row = signal_row(r)
        out.append(
            f"| {r.record['case']} | {r.base:.3f} | {r.delta:+.3f} | {r.guarded - r.base:+.3f} | "
            f"{decision(r) if r.kept is None else f'kept epoch {r.kept}'} | "
            + " | ".join(fmt(row[k]) for k, _ in SIGNAL_COLUMNS)
            + " |"
        )
    out += ["", "</details>"]
    return out


def confusion(replays: list[Replay]) -> list[str]:
    columns = ("kept (last epoch)", "kept (earlier epoch)", "reverted")
    out = [
        f"Rows: true outcome of the unguarded refinement (helpful: Δ > +{HELPFUL}, harmful: "
        f"Δ < {HARMFUL}, neutral otherwise). Columns: the guard's decision. Cells: scans "
        "(mean realised Δ sDice with the guard).",
        "",
        "| task | outcome | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    tasks = ["all", *sorted({r.record["task"] for r in replays}, key=TASKS.index)]
    for task in tasks:
        for kind in ("helpful", "neutral", "harmful"):
            rs = [
                r for r in replays if task in ("all", r.record["task"]) and outcome(r.delta) == kind
            ]
            cells = []
            for column in columns:
                group = [r for r in rs if decision(r) == column]
                cells.append(
                    f"{len(group)} ({mean([r.guarded - r.base for r in group]):+.3f})"
                    if group
                    else "0"
                )
            out.append(f"| {task} | {kind} | " + " | ".join(cells) + " |")
    return out


def epoch_selection(replays: list[Replay]) -> list[str]:
    """Mean sDice of label-free epoch choices against the last epoch and the oracle best."""
    rules: dict[str, Callable[[dict[str, Any]], int]] = {
        "epoch 1": lambda rec: 0,
        "last (unguarded)": lambda rec: len(rec["epochs"]) - 1,
        "max self-consistency": lambda rec: int(
            np.argmax([e["signals"]["self_consistency"] for e in rec["epochs"]])
        ),
        "min entropy": lambda rec: int(np.argmin([e["signals"]["entropy"] for e in rec["epochs"]])),
        "oracle best (needs labels)": lambda rec: int(
            np.argmax([e["sdice"] for e in rec["epochs"]])
        ),
    }
    out = [
        "| task | base | "
        + " | ".join(rules)
        + " | guard: last passing epoch (product) | guard: passing epoch of max self-consistency |",
        "|---|---|" + "---|" * len(rules) + "---|---|",
    ]
    for task in sorted({r.record["task"] for r in replays}, key=TASKS.index):
        rs = [r for r in replays if r.record["task"] == task]
        cells = [fmt(mean([r.base for r in rs]))]
        for rule in rules.values():
            cells.append(fmt(mean([r.record["epochs"][rule(r.record)]["sdice"] for r in rs])))
        cells.append(fmt(mean([r.guarded for r in rs])))
        cells.append(fmt(mean([guarded_max_consistency(r) for r in rs])))
        out.append(f"| {task} | " + " | ".join(cells) + " |")
    return out


def guarded_max_consistency(r: Replay) -> float:
    """The alternative guarded choice: the passing epoch with the highest self-consistency."""
    if not r.passing:
        return r.base
    epochs = r.record["epochs"]
    best = max(r.passing, key=lambda e: epochs[e - 1]["signals"]["self_consistency"])
    return float(epochs[best - 1]["sdice"])


def sweep_table(rows: list[Row]) -> list[str]:
    """For each min_agreement, the best passing max_volume_change (or the best failing one)."""
    out = [
        "| min_agreement | max_volume_change | tissue worst domain Δ | "
        + " | ".join(f"{t} gain kept" for t in TASKS if t != HARM_TASK)
        + " | score | meets (a) and (b) |",
        "|---|---|---|" + "---|" * (len(TASKS) - 1) + "---|---|",
    ]
    for agreement in GRID["min_agreement"]:
        group = [row for row in rows if row[0].min_agreement == agreement]
        best = max(group, key=lambda row: (row[1] and row[2], round(row[4], 4)))
        config, ok_a, ok_b, figures, value = best
        out.append(
            f"| {agreement:g} | {config.max_volume_change:g} | {figures['worst_harm']:+.3f} | "
            + " | ".join(f"{figures.get(t, float('nan')):.0%}" for t in TASKS if t != HARM_TASK)
            + f" | {value:.4f} | {'yes' if ok_a and ok_b else 'no'} |"
        )
    return out


def saved_section(
    args: argparse.Namespace, product: GuardConfig, name: str, title: str, note: str
) -> list[str]:
    """A table another command saved, when it ran with the current product guard."""
    path = args.work / name
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if saved["config"] != json.loads(json.dumps(dataclasses.asdict(product))):
        print(f"NOTE: {path} was made with another guard setting: re-run it", flush=True)
        return []
    return ["", title, "", note, "", saved["markdown"]]


def other_numerics_section(
    records: list[dict[str, Any]], product: GuardConfig, kind: str
) -> list[str]:
    """The held-out scans again at the other numerics: do the thresholds transfer?"""
    if not records:
        return []
    replays = [replay(r, product) for r in records]
    return [
        "",
        f"#### Held-out at {kind} numerics (same seeds, same guard)",
        "",
        "Refinement trajectories are chaotic: the same scan refined in another precision can end "
        "elsewhere, so this is a second draw of every held-out refinement.",
        "",
        *cell_table(replays),
        "",
        *[f"- {line}" for line in must_hold(replays)],
        "",
        *confusion(replays)[2:],
    ]


def calibrate(args: argparse.Namespace) -> None:
    suffix = lr_suffix(args)
    calibration = load_records(args, CALIBRATION_SEED, args.calibrate_on + suffix)
    product_numerics = numerics("auto")
    held_out = load_records(args, HELD_OUT_SEED, product_numerics + suffix)
    other_numerics = "fp32" if product_numerics == "bf16" else "bf16"
    held_out_other = load_records(args, HELD_OUT_SEED, other_numerics + suffix)
    if not calibration or not held_out:
        raise SystemExit("no records: run `python bench/guard_calibration.py collect` first")
    rows = sweep(calibration, GRID)
    best = chosen(rows)
    product = product_config(args)
    print(f"calibrated: {best}\nproduct defaults: {product}", flush=True)
    if best != product:
        print(
            "NOTE: the product defaults differ from the calibrated thresholds; the held-out "
            "figures below are the product's (update sitefit/defaults.py)",
            flush=True,
        )
    replays = [replay(r, product) for r in held_out]
    unguarded = [replay(r, dataclasses.replace(product, enabled=False)) for r in held_out]
    assert all(r.guarded == r.unguarded for r in unguarded)
    seconds = [r["seconds"] for r in held_out + calibration]
    n_cal = len(calibration) // max(1, len(by_cell([replay(r, best) for r in calibration])))
    n_held = len(held_out) // max(1, len(by_cell(replays)))
    text = [
        "Command: `python bench/guard_calibration.py collect && python bench/guard_calibration.py"
        " calibrate` (then `verify`, `steps`)  ",
        f"Machine: {platform.processor() or platform.machine()}, 1 torch thread per process "
        f"(shared 2-core host), torch {torch.__version__}, CPU; refinement "
        f"{mean(seconds):.0f} s per scan on average.  ",
        f"Setup: base models `bench-brain`, `bench-heart`, `bench-tissue` (M=16, {args.n_train} "
        f"source subjects, {args.epochs} U-Net + {head_epochs(args)} head epochs, FOV "
        f"{args.fov_mm:g} mm); refinement as the product's defaults (Adam lr "
        f"{args.lr:g}{' (batch-norm statistics only)' if args.lr == 0 else ''}, "
        f"batch {defaults.REFINE_BATCH_SIZE}, BN train, at most "
        f"{defaults.REFINE_MAX_EPOCHS} epochs, stop at |ΔDice| < {defaults.REFINE_STOP_DELTA}). "
        f"One unguarded refinement per scan; the guard's decision (`worker.guard.decide`) is "
        f"replayed on every epoch's recorded signals. Thresholds chosen on calibration seed "
        f"{CALIBRATION_SEED} ({n_cal} scans per task x domain, {args.calibrate_on} numerics); "
        f"every figure below is on held-out seed {HELD_OUT_SEED} ({n_held} scans per task x "
        f"domain) at the product's numerics on this machine ({product_numerics}: "
        "`worker.inference` precision auto), unless marked. Surface Dice at 1 mm vs ground "
        "truth, mean over foreground classes, mean over scans.",
        "",
        "#### Calibrated thresholds",
        "",
        f"Selection (calibration seed): among settings where (a) no `{HARM_TASK}` domain's guarded "
        f"mean sDice is more than {MAX_HARM} below the base model and (b) brain and heart each "
        f"keep >= {MIN_GAIN_KEPT:.0%} of the unguarded one-shot gain, the one with the highest "
        "mean guarded sDice (task x domain cells weighted equally). "
        f"{sum(r[1] and r[2] for r in rows)} of {len(rows)} settings pass. Chosen: "
        + ", ".join(
            f"`{f.name}` = {getattr(best, f.name):g}"
            for f in dataclasses.fields(best)
            if f.name != "enabled"
        )
        + ("" if best == product else " (NOTE: not the product defaults, which are reported)"),
        "",
        *sweep_table(rows),
        "",
        "#### Held-out: base, unguarded and guarded one-shot",
        "",
        *cell_table(replays),
        "",
        *[f"- {line}" for line in must_hold(replays)],
        "",
        "#### Held-out: guard signals vs true change in surface Dice",
        "",
        *signals_tables(replays),
        "",
        "#### Held-out: the guard's confusion matrix",
        "",
        *confusion(replays),
        "",
        "#### Held-out: which epoch to keep",
        "",
        "Mean sDice of the epoch each rule picks (unguarded: no revert).",
        "",
        *epoch_selection(replays),
        *other_numerics_section(held_out_other, product, other_numerics),
        *saved_section(
            args,
            product,
            f"verify{lr_suffix(args)}.json",
            "#### The product path: `Engine` vs replay",
            "Held-out scans run through `Engine.run` (mode adapt, guard on, defaults); "
            "`python bench/guard_calibration.py verify`.",
        ),
        *saved_section(
            args,
            product,
            f"steps{lr_suffix(args)}.json",
            "#### Step rule (held-out scans)",
            "Same loop with the optimiser swapped (`steps`; SGD with momentum 0.9); "
            "guard = product defaults; oracle = best epoch by true sDice. "
            "`python bench/guard_calibration.py steps`.",
        ),
    ]
    body = "\n".join(text)
    print(body)
    summary = {
        "calibrated": dataclasses.asdict(best),
        "product": dataclasses.asdict(product),
        "held_out": [
            {
                "case": r.record["case"],
                "task": r.record["task"],
                "domain": r.record["domain"],
                "base": r.base,
                "unguarded": r.unguarded,
                "guarded": r.guarded,
                "kept": r.kept,
                "reason": r.reason,
            }
            for r in replays
        ],
    }
    (args.work / "calibration.json").write_text(json.dumps(summary, indent=1, default=str))
    if not args.no_write:
        title = "Adaptation guard: calibration for " + (
            "the product default (lr 0: batch-norm statistics)"
            if args.lr == 0
            else f"the paper's self-training (lr {args.lr:g})"
        )
        replace_section(args.out, f"guard_calibration{suffix}", title, body)
        print(f"wrote {args.out}")


# --- the product path: the real Engine reproduces the offline decision ------------------------


def verify(args: argparse.Namespace) -> None:
    """Run held-out scans through ``Engine`` (guard on, product defaults) and compare the kept
    epoch and the resulting surface Dice with the offline replay of the same scan's record."""
    torch.set_num_threads(1)
    product = product_config(args)
    # the engine's numerics, and the records of this learning rate
    held_out = load_records(args, HELD_OUT_SEED, numerics("auto") + lr_suffix(args))
    lines = [
        "| case | offline: kept epoch (point) | engine: best_epoch (point) | engine verdict | "
        "offline sDice | "
        "engine sDice | same |",
        "|---|---|---|---|---|---|---|",
    ]
    agree = 0
    for task in args.tasks:
        root, spec = model_for(task, args)
        store = ModelStore(
            models=FilesystemBackend(root), sites=FilesystemBackend(args.work / "verify-sites")
        )
        engine = Engine(Settings(home=args.work / "home", device="cpu", refine_lr=args.lr), store)
        replays = [replay(r, product) for r in held_out if r["task"] == task]
        # Prefer scans where the guard does something (revert, earlier epoch), then others.
        replays.sort(key=lambda r: (decision(r) == "kept (last epoch)", r.record["case"]))
        for r in replays[: args.n_verify]:
            rec = r.record
            image = next(
                p
                for p in case_paths(task, rec["domain"], rec["seed"], args.n_held_out, args)
                if p.name.startswith(rec["case"] + "_")
            )
            report = engine.run(SegmentRequest(image, spec.name, None, "adapt", label_of(image)))
            result = report.report
            assert result.guard is not None and result.reference is not None
            sdice = result.reference.after.surface_dice or 0.0
            # with the statistics path the engine evaluates its points from the last one back
            # and stops at the first the guard accepts, so epochs are compared as points
            # (records of the first collect of this format do not keep their points: theirs
            # are the whole default path, every point evaluated in order)
            points: list[float] = rec.get("path_points") or (
                list(defaults.REFINE_STATISTICS_PATH) if args.lr == 0 else []
            )
            offline = kept_point(r.kept, points)
            online = kept_point(result.refinement.best_epoch, result.refinement.path_points or [])
            same = offline == online and abs(sdice - r.guarded) < 1e-4
            agree += same
            lines.append(
                f"| {rec['case']} | {offline if offline is not None else 'reverted'} | "
                f"{online} | {result.guard.verdict} | {r.guarded:.4f} | "
                f"{sdice:.4f} | {'yes' if same else 'NO'} |"
            )
            print(lines[-1], flush=True)
    lines.append("")
    lines.append(
        f"{agree} of {len(lines) - 3} scans: the engine kept the epoch the offline replay keeps "
        "and gave the same surface Dice (within 1e-4)."
    )
    text = "\n".join(lines)
    print(text)
    saved = {"config": dataclasses.asdict(product), "markdown": text}
    (args.work / f"verify{lr_suffix(args)}.json").write_text(json.dumps(saved, indent=1))


def lr_suffix(args: argparse.Namespace) -> str:
    """ "" for the paper's learning rate, else "-lrLR": the records' folder and saved tables."""
    return args.folder.removeprefix(args.numerics)


def kept_point(epoch: int | None, points: Sequence[float]) -> float | int | None:
    """The kept epoch as the statistics path's point when there is one, else the epoch."""
    if epoch is None or not points:
        return epoch
    return points[epoch - 1]


# --- step rule and epoch choice -----------------------------------------------------------------

STEP_RULES = (("adam", 1e-3), ("adam", 1e-4), ("sgd", 1e-2))


def steps(args: argparse.Namespace) -> None:
    """Refine a few held-out scans with other step rules; compare the epoch choices."""
    torch.set_num_threads(1)
    product = product_config(args)
    table = [
        "| task | domains | step rule | scans | base | last epoch | guard (kept or base) | "
        "oracle best epoch | epochs | reverted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[str, list[str]] = {}
    for cell in args.steps_cells:
        task, domain = cell.split(":")
        cells.setdefault(task, []).append(domain)
    for task, domains in cells.items():
        root, spec = model_for(task, args)
        tensors = BaseModelRegistry(root).tensors(spec)
        for rule, lr in STEP_RULES:
            records = []
            for domain in domains:
                images = case_paths(task, domain, HELD_OUT_SEED, args.n_held_out, args)
                for index, image in enumerate(images[: args.n_steps]):
                    default = rule == "adam" and lr == defaults.PAPER_REFINE_LR
                    name = f"{task}-{domain}-{rule}-{lr:g}-{index:02d}.json"
                    path = (  # the paper's records are collect's (its folder, not --lr's)
                        record_path(args, task, domain, HELD_OUT_SEED, index,
                                    folder=args.numerics)
                        if default
                        else args.work / "records-steps" / args.numerics / name
                    )  # fmt: skip
                    model = spec.ref
                    if not path.exists() or not current(json.loads(path.read_text()), model, lr):
                        config = RefineConfig(learning_rate=lr, precision=args.precision)
                        record = refine_scan(spec, tensors, image, config, rule)
                        record.update(task=task, domain=domain, role=DOMAINS[domain].role,
                                      seed=HELD_OUT_SEED, index=index)  # fmt: skip
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(record, indent=1))
                    records.append(json.loads(path.read_text()))
            rs = [replay(r, product) for r in records]
            best = mean([max(e["sdice"] for e in r.record["epochs"]) for r in rs])
            table.append(
                f"| {task} | {', '.join(domains)} | {rule} lr {lr:g} | {len(rs)} | "
                f"{mean([r.base for r in rs]):.3f} | {mean([r.unguarded for r in rs]):.3f} | "
                f"{mean([r.guarded for r in rs]):.3f} | {best:.3f} | "
                f"{mean([len(r.record['epochs']) for r in rs]):.1f} | "
                f"{sum(r.kept is None for r in rs)} |"
            )
            print(table[-1], flush=True)
    text = "\n".join(table)
    print(text)
    saved = {"config": dataclasses.asdict(product), "markdown": text}
    (args.work / f"steps{lr_suffix(args)}.json").write_text(json.dumps(saved, indent=1))


# --- command line -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["collect", "calibrate", "verify", "steps"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--n-calibration", type=int, default=3, help="scans per task x domain")
    parser.add_argument("--n-held-out", type=int, default=3, help="scans per task x domain")
    parser.add_argument("--n-verify", type=int, default=4, help="held-out scans for `verify`")
    parser.add_argument("--n-steps", type=int, default=2, help="scans per domain for `steps`")
    parser.add_argument(
        "--steps-cells",
        nargs="+",
        default=["tissue:a15t", "tissue:b3t", "brain:a15t", "brain:b3t", "heart:a3t", "heart:d3t"],
        help="TASK:DOMAIN cells for `steps`",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="numerics of `collect` and `steps` (auto: the product's, bf16 where native)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[CALIBRATION_SEED, HELD_OUT_SEED],
        help="phantom seeds `collect` runs",
    )
    parser.add_argument(
        "--calibrate-on",
        choices=["fp32", "bf16"],
        default="fp32",
        help="numerics of the calibration-seed records the thresholds are chosen on",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=defaults.PAPER_REFINE_LR,
        help="refinement learning rate (0: batch-norm statistics only, the product default); "
        "records of another than the paper's 1e-3 go to records/NUMERICS-lrLR",
    )
    parser.add_argument("--fov-mm", type=float, default=80.0)
    parser.add_argument("--n-train", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--head-epochs", type=int, default=6)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--shared-models", type=Path, default=SHARED_MODELS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print, leave docs alone")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.numerics = numerics(args.precision)
    args.folder = args.numerics + ("" if args.lr == defaults.PAPER_REFINE_LR else f"-lr{args.lr:g}")
    commands: dict[str, Callable[[argparse.Namespace], None]] = {
        "collect": collect,
        "calibrate": calibrate,
        "verify": verify,
        "steps": steps,
    }
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
