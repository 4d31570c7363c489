"""Quality benchmark on the scanner phantoms: the paper's Tables 1-3 for sitefit's engine.

For each task (``brain`` and ``heart``, where context decides; ``tissue``, the harm task where
the early head is already strong): train a base model on the source domain, then on every
domain
- one-shot (Table 2): refine on each test scan alone, through the product's ``Engine``,
  for each batch-norm option; the guard's output and, from the same refinement, the last
  epoch's (what the output would be without the guard: ``reference.last_epoch``);
- refine on N (Table 1): refine once on all N test scans of the domain, evaluate on them;
- fixed adapted model (Table 3): that model, no further refinement, on unseen scans, beside
  each unseen scan refined on itself (one-shot): the share of the one-shot gain it keeps;
- site cache (shifted domains): adapt on one scan of the site, then ``cached`` on each test
  scan (all from that one version), then ``auto`` on each (which may refine and save).
Figures are surface Dice at 1 mm against the phantom's ground truth (mean over foreground
classes), plus volumetric Dice. Results go to ``docs/benchmarks.md`` (between markers) and a
JSON file. Usage::

    python bench/adapt_quality.py                 # full run (tens of minutes on 2 CPU cores)
    python bench/adapt_quality.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from sitefit.metrics import overlap_per_class  # noqa: E402
from sitefit.phantoms import DOMAINS, write_dataset  # noqa: E402
from sitefit.report import Report  # noqa: E402
from sitefit.settings import Settings  # noqa: E402
from sitefit.volume import load_label_map, load_scan  # noqa: E402
from worker.engine import Engine, SegmentRequest  # noqa: E402
from worker.inference import foreground_dice, predict  # noqa: E402
from worker.preprocess import PreparedScan, prepare_scan  # noqa: E402
from worker.refinement import refine  # noqa: E402
from worker.training import TrainConfig, train_base_model  # noqa: E402

TEST_SEED, UNSEEN_SEED, SITE_SEED = 1000, 2000, 3000
POOLED_SCANS = 3  # scans of the site adapted in turn before the pooled version is cached
# how far a 1-scan site version moves from the base model's statistics to the scan's
ONE_SCAN_WEIGHT = 1 / (1 + defaults.SITE_STATISTICS_PRIOR)


@dataclass
class Case:
    image: Path
    label: Path


@dataclass
class DomainResult:
    domain: str
    role: str
    base: list[float] = field(default_factory=list)
    base_dice: list[float] = field(default_factory=list)
    one_shot: dict[str, list[float]] = field(default_factory=dict)
    one_shot_dice: dict[str, list[float]] = field(default_factory=dict)
    one_shot_epochs: dict[str, list[int]] = field(default_factory=dict)
    one_shot_seconds: dict[str, list[float]] = field(default_factory=dict)
    refine_on_n: list[float] = field(default_factory=list)
    unseen_base: list[float] = field(default_factory=list)
    unseen_fixed: list[float] = field(default_factory=list)
    # each unseen scan refined on itself (Table 2 on Table 3's scans): the gain to compare with
    unseen_one_shot: list[float] = field(default_factory=list)
    # the last epoch of the same refinements: the output without the guard
    one_shot_last: dict[str, list[float]] = field(default_factory=dict)
    decisions: list[str] = field(default_factory=list)  # kept last | kept earlier | reverted
    reverted: int = 0
    site_saved: bool = False
    site_saved_consistency: float | None = None
    site: dict[str, list[float]] = field(default_factory=dict)
    site_seconds: dict[str, list[float]] = field(default_factory=dict)
    site_consistency: dict[str, list[float | None]] = field(default_factory=dict)
    auto_paths: list[str] = field(default_factory=list)
    pooled_scans: int = 0  # scans the pooled site version was refined on


def cases(task: str, domain: str, n: int, seed: int, fov: float, work: Path) -> list[Case]:
    out = write_dataset(task, domain, n, seed, work / "data" / f"{task}-{domain}-{seed}-{n}", fov)
    images = sorted((out / "imagesTr").glob("*_0000.nii.gz"))
    labels = sorted((out / "labelsTr").glob("*.nii.gz"))
    return [Case(i, lab) for i, lab in zip(images, labels, strict=True)]


def side_options(args: argparse.Namespace) -> str:
    """How the early head was trained and when a site saves its first version, for a
    section title; "" with the defaults."""
    options = [
        f"{name} {value}"
        for name, value, default in (
            ("head statistics", args.head_statistics, defaults.HEAD_STATISTICS),
            ("head augmentation", args.head_augmentation, defaults.HEAD_AUGMENTATION),
            ("site first save", args.site_first_save, defaults.SITE_FIRST_SAVE),
        )
        if value != default
    ]
    return f", {', '.join(options)}" if options else ""


def base_model(task: str, args: argparse.Namespace, registry: BaseModelRegistry) -> ModelSpec:
    name = f"bench-{task}"
    source = next(n for n, d in DOMAINS.items() if d.role == "source")
    config = TrainConfig(
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        head_statistics=args.head_statistics,
        head_augmentation=args.head_augmentation,
        seed=args.seed,
    )
    data = write_dataset(
        task,
        source,
        args.n_train,
        args.seed,
        args.work / "data" / f"{task}-{source}-train",
        args.fov_mm,
    )
    wanted = (
        args.epochs,
        args.head_epochs,
        args.head_statistics,
        args.head_augmentation,
        args.n_train,
    )
    # newest first: a run with other head options trains (or reuses) a version of its own
    for version in reversed(registry.versions(name)):
        spec = registry.spec(f"{name}@{version}")
        if (
            spec.training.epochs,
            spec.training.head_epochs,
            spec.training.head_statistics,
            spec.training.head_augmentation,
            len(spec.training.train_cases) + len(spec.training.validation_cases),
        ) == wanted:
            print(f"[{task}] reusing base model {name}@{spec.version}", flush=True)
            return spec
    print(f"[{task}] training base model on {args.n_train} {source} subjects", flush=True)
    return train_base_model(
        data,
        name,
        config,
        registry,
        torch.device("cpu"),
        log=lambda line: print(f"[{task}]   {line}", flush=True),
    )


def mean_sdice(
    spec: ModelSpec, labels: np.ndarray, reference: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[float, float]:
    foreground = {k: v for k, v in spec.classes.items() if k}
    figures = overlap_per_class(labels, reference, foreground, spacing, 1.0)
    sd = [f["surface_dice"] for f in figures.values() if f["surface_dice"] is not None]
    di = [f["dice"] for f in figures.values() if f["dice"] is not None]
    return float(np.mean(sd)) if sd else 0.0, float(np.mean(di)) if di else 0.0


def evaluate(engine: Engine, spec: ModelSpec, net: torch.nn.Module, case: Case) -> float:
    scan = load_scan(case.image, engine.settings.max_voxels)
    prepared = prepare_scan(scan, spec.slice_axis, engine.device)
    prediction = predict(net, prepared.slices, engine.settings.refine_batch_size,  # type: ignore[arg-type]
                         region=prepared.region)  # fmt: skip
    reference = load_label_map(case.label, like=scan)
    return mean_sdice(spec, prepared.volume(prediction.final), reference, scan.spacing_mm)[0]


def refine_on_many(engine: Engine, spec: ModelSpec, test: list[Case]) -> torch.nn.Module:
    """Table 1's setting: one refinement on the slices of all of a domain's test scans.

    The scans differ in size, so their slices are padded to one size and, unlike the
    engine's one-scan refinement, its stopping rule counts that padding too.
    """
    prepared: list[PreparedScan] = [
        prepare_scan(load_scan(c.image, engine.settings.max_voxels), spec.slice_axis, engine.device)
        for c in test
    ]
    height = max(p.slices.shape[2] for p in prepared)
    width = max(p.slices.shape[3] for p in prepared)
    stack = torch.cat(
        [
            torch.nn.functional.pad(
                p.slices, (0, width - p.slices.shape[3], 0, height - p.slices.shape[2])
            )
            for p in prepared
        ]
    )
    net = engine.base_net(spec)
    base = predict(net, stack, engine.settings.refine_batch_size)
    classes = len(spec.classes)
    refine(
        net,
        stack,
        classes,
        foreground_dice(base.early, base.final, classes),
        engine.refine_config(),
    )
    return net


def run_task(task: str, args: argparse.Namespace) -> list[DomainResult]:
    home = args.work / "home"
    registry = BaseModelRegistry(home / "models")
    spec = base_model(task, args, registry)
    results = []
    for domain_name, domain in DOMAINS.items():
        result = DomainResult(domain_name, domain.role)
        test = cases(task, domain_name, args.n_test, TEST_SEED, args.fov_mm, args.work)
        for mode in args.batchnorm:
            # site=None: every refinement starts from the base model (one-shot, Table 2)
            engine = make_engine(args, home, mode, args.work / "sites-unused")
            for case in test:
                report = engine.run(SegmentRequest(case.image, spec.ref, None, "adapt",
                                                   case.label)).report  # fmt: skip
                assert report.reference is not None and report.guard is not None
                last = report.reference.last_epoch
                assert last is not None
                if mode == args.batchnorm[0]:
                    result.base.append(report.reference.before.surface_dice or 0.0)
                    result.base_dice.append(report.reference.before.dice or 0.0)
                    result.reverted += report.guard.verdict == "reverted"
                    result.decisions.append(decision(report.guard.verdict,
                                                     report.refinement.best_epoch,
                                                     report.refinement.epochs))  # fmt: skip
                result.one_shot.setdefault(mode, []).append(
                    report.reference.after.surface_dice or 0.0
                )
                result.one_shot_last.setdefault(mode, []).append(last.surface_dice or 0.0)
                result.one_shot_dice.setdefault(mode, []).append(report.reference.after.dice or 0.0)
                result.one_shot_epochs.setdefault(mode, []).append(report.refinement.epochs)
                result.one_shot_seconds.setdefault(mode, []).append(job_seconds(report))
        print(
            f"[{task}] {domain_name:6s} base {np.mean(result.base):.3f}  one-shot "
            + "  ".join(
                f"{m}: {np.mean(v):.3f} (unguarded {np.mean(result.one_shot_last[m]):.3f})"
                for m, v in result.one_shot.items()
            ),
            flush=True,
        )
        if not args.skip_tables13:
            engine = make_engine(args, home, args.batchnorm[0], args.work / "sites-unused")
            adapted = refine_on_many(engine, spec, test)
            result.refine_on_n = [evaluate(engine, spec, adapted, c) for c in test]
            unseen = cases(task, domain_name, args.n_unseen, UNSEEN_SEED, args.fov_mm, args.work)
            base_net = engine.base_net(spec)
            result.unseen_base = [evaluate(engine, spec, base_net, c) for c in unseen]
            result.unseen_fixed = [evaluate(engine, spec, adapted, c) for c in unseen]
            for case in unseen:
                report = engine.run(SegmentRequest(case.image, spec.ref, None, "adapt",
                                                   case.label)).report  # fmt: skip
                assert report.reference is not None
                result.unseen_one_shot.append(report.reference.after.surface_dice or 0.0)
            print(
                f"[{task}] {domain_name:6s} refine-on-{len(test)} "
                f"{np.mean(result.refine_on_n):.3f}; unseen base {np.mean(result.unseen_base):.3f}"
                f" fixed {np.mean(result.unseen_fixed):.3f}"
                f" one-shot {np.mean(result.unseen_one_shot):.3f}",
                flush=True,
            )
        if domain.role == "shifted" and not args.skip_site_cache:
            site_cache(task, args, home, spec, domain_name, test, result)
        results.append(result)
    return results


def job_seconds(report: Report) -> float:
    """The job's wall time without the benchmark's own work: loading the ground truth and
    comparing with it (``timings_s.reference``), which a job sent without one does not do."""
    return report.timings_s.total - report.timings_s.reference


def decision(verdict: str, kept: int | None, epochs: int) -> str:
    if verdict == "reverted" or kept is None:
        return "reverted"
    return "kept last" if kept == epochs else "kept earlier"


def make_engine(args: argparse.Namespace, home: Path, batchnorm: str, sites: Path) -> Engine:
    settings = Settings(home=home, device="cpu", refine_batchnorm=batchnorm,  # type: ignore[arg-type]
                        refine_max_epochs=args.refine_epochs,
                        refine_lr=args.refine_lr,
                        refine_statistics_average=args.statistics_average,
                        site_first_save=args.site_first_save)  # fmt: skip
    return Engine(
        settings,
        ModelStore(models=FilesystemBackend(home / "models"), sites=FilesystemBackend(sites)),
    )


def site_cache(
    task: str,
    args: argparse.Namespace,
    home: Path,
    spec: ModelSpec,
    domain: str,
    test: list[Case],
    result: DomainResult,
) -> None:
    """Issue 3's setting: adapt on one scan of the site, then ``cached`` on every test scan
    (all from that version, as the paper's Table 3), then ``auto`` on every test scan in turn
    (which refines and saves new versions where it does not take the cached path)."""
    sites = args.work / "sites" / task / domain
    shutil.rmtree(sites, ignore_errors=True)
    engine = make_engine(args, home, args.batchnorm[0], sites)
    first = cases(task, domain, 1, SITE_SEED, args.fov_mm, args.work)[0]
    report = engine.run(SegmentRequest(first.image, spec.ref, domain, "adapt", first.label)).report
    result.site_saved = report.site_weights.saved_version is not None
    saved = engine.store.sites.latest(domain, spec.name)
    result.site_saved_consistency = saved.self_consistency_after if saved else None
    # mode adapt for the site on the same scans, timed next to auto, on a copy of the site's
    # store so that the versions it saves do not reach auto's
    adapt_sites = sites.with_name(f"{domain}-adapt")
    shutil.rmtree(adapt_sites, ignore_errors=True)
    if sites.exists():  # the first adapt saved a version
        shutil.copytree(sites, adapt_sites)
    adapt_engine = make_engine(args, home, args.batchnorm[0], adapt_sites)
    for mode in ("cached", "auto"):
        for case in test:
            report = engine.run(SegmentRequest(case.image, spec.ref, domain, mode,
                                               case.label)).report  # fmt: skip
            seconds = job_seconds(report)
            assert report.reference is not None
            result.site.setdefault(mode, []).append(report.reference.after.surface_dice or 0.0)
            result.site_seconds.setdefault(mode, []).append(seconds)
            result.site_consistency.setdefault(mode, []).append(
                report.site_weights.self_consistency_on_scan
            )
            if mode == "auto":
                result.auto_paths.append(report.mode_used)
                # adapt on the same scan right after, for the site and without one (the
                # one-shot table's runs are minutes apart, under other load)
                adapted = adapt_engine.run(SegmentRequest(case.image, spec.ref, domain,
                                                          "adapt")).report  # fmt: skip
                result.site_seconds.setdefault("adapt", []).append(job_seconds(adapted))
                alone = engine.run(SegmentRequest(case.image, spec.ref, None, "adapt")).report
                result.site_seconds.setdefault("one_shot", []).append(job_seconds(alone))
    # A site refined on several scans in turn: its version pools their statistics
    # (Settings.site_statistics), which `cached` then uses on the same test scans.
    pooled = sites.with_name(f"{domain}-pooled")
    shutil.rmtree(pooled, ignore_errors=True)
    engine = make_engine(args, home, args.batchnorm[0], pooled)
    for case in cases(task, domain, POOLED_SCANS, SITE_SEED, args.fov_mm, args.work):
        engine.run(SegmentRequest(case.image, spec.ref, domain, "adapt", case.label))
    latest = engine.store.sites.latest(domain, spec.name)
    result.pooled_scans = latest.scans_refined if latest else 0
    for case in test:
        report = engine.run(SegmentRequest(case.image, spec.ref, domain, "cached",
                                           case.label)).report  # fmt: skip
        assert report.reference is not None
        result.site.setdefault("cached_pooled", []).append(
            report.reference.after.surface_dice or 0.0
        )
    print(
        f"[{task}] {domain:6s} site cache: saved={result.site_saved} cached "
        f"{np.mean(result.site['cached']):.3f} auto {np.mean(result.site['auto']):.3f} "
        f"(paths {result.auto_paths}); cached after {result.pooled_scans} pooled scans "
        f"{np.mean(result.site['cached_pooled']):.3f}",
        flush=True,
    )


HARM_TASK = "tissue"  # issue 6: the early head is strong here, refinement can only hurt
HELPFUL, HARMFUL = 0.01, -0.01  # change of surface Dice (unguarded vs base) that counts


def gain(values: list[float], base: list[float]) -> float:
    return statistics.mean(values) - statistics.mean(base)


def verdicts(task: str, results: list[DomainResult], mode: str) -> list[str]:
    """The issues' required results, each with PASS/FAIL, for the product's output (guarded)."""
    shifted = [r for r in results if r.role == "shifted"]
    near = [r for r in results if r.role == "near-source"]
    lines = []
    if task == HARM_TASK:
        worst = min(gain(r.one_shot[mode], r.base) for r in results)
        worst_raw = min(gain(r.one_shot_last[mode], r.base) for r in results)
        lines.append(
            f"{task} (harm task): guarded, the worst domain's mean change is {worst:+.3f} "
            f"(need >= -0.01): {'PASS' if worst >= -0.01 else 'FAIL'}; unguarded it is "
            f"{worst_raw:+.3f}"
        )
    else:
        gains = [gain(r.one_shot[mode], r.base) for r in shifted]
        n_up = sum(g >= 0.05 for g in gains)
        lines.append(
            f"{task}: one-shot gain >= 0.05 on {n_up} of {len(gains)} shifted domains "
            f"(need 3): {'PASS' if n_up >= 3 else 'FAIL'}"
        )
        change = gain(near[0].one_shot[mode], near[0].base) if near else float("nan")
        lines.append(
            f"{task}: near-source change {change:+.3f} (need >= -0.01): "
            f"{'PASS' if change >= -0.01 else 'FAIL'}"
        )
        guarded = statistics.mean(gain(r.one_shot[mode], r.base) for r in results)
        unguarded = statistics.mean(gain(r.one_shot_last[mode], r.base) for r in results)
        if unguarded > 1e-9:
            share = guarded / unguarded
            lines.append(
                f"{task}: the guard keeps {share:.0%} of the unguarded mean gain over all domains "
                f"({guarded:+.3f} of {unguarded:+.3f}; need >= 90%): "
                f"{'PASS' if share >= 0.9 else 'FAIL'}"
            )
        else:
            lines.append(
                f"{task}: unguarded refinement has no mean gain ({unguarded:+.3f}); guarded "
                f"{guarded:+.3f}: {'PASS' if guarded >= unguarded - 1e-9 else 'FAIL'} "
                "(the guard must not do worse than no guard)"
            )
    base = [statistics.mean(r.base) for r in shifted]
    useful = all(b >= 0.3 for b in base) and not all(statistics.mean(r.base) >= 0.97
                                                     for r in results)  # fmt: skip
    lines.append(
        f"{task}: base surface Dice on shifted domains {', '.join(f'{b:.2f}' for b in base)}"
        f" (useful benchmark: none < 0.3, not all >= 0.97): {'PASS' if useful else 'FAIL'}"
    )
    return lines


def confusion(task: str, results: list[DomainResult], mode: str) -> list[str]:
    """Guard decisions against the true effect of the unguarded refinement, per scan."""
    counts: dict[tuple[str, str], int] = {}
    for r in results:
        for raw, base, made in zip(r.one_shot_last[mode], r.base, r.decisions, strict=True):
            delta = raw - base
            truth = "helpful" if delta > HELPFUL else "harmful" if delta < HARMFUL else "neutral"
            counts[truth, made] = counts.get((truth, made), 0) + 1
    made_all = ("kept last", "kept earlier", "reverted")
    out = [
        f"Guard decisions, task `{task}`, one per test scan: the unguarded refinement's true "
        f"effect (last epoch vs base; helpful > +{HELPFUL}, harmful < {HARMFUL}) against what "
        "the guard did. These seeds were not used to set the guard's thresholds.",
        "",
        "| unguarded effect | " + " | ".join(made_all) + " |",
        "|---|" + "---|" * len(made_all),
    ]
    for truth in ("helpful", "neutral", "harmful"):
        out.append(f"| {truth} | " + " | ".join(str(counts.get((truth, m), 0))
                                                for m in made_all) + " |")  # fmt: skip
    return [*out, ""]


def markdown(
    all_results: dict[str, list[DomainResult]], args: argparse.Namespace, seconds: float
) -> str:
    def m(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f}" if values else "–"

    out = [
        f"Command: `python bench/adapt_quality.py {' '.join(args.argv)}`".rstrip() + "  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}, CPU; wall time {seconds / 60:.1f} min.  ",
        f"Setup: base model trained on {args.n_train} source subjects ({args.epochs} U-Net + "
        f"{args.head_epochs} head epochs, M=16; early head under {args.head_statistics} "
        f"statistics, augmentation {args.head_augmentation}), FOV {args.fov_mm:g} mm; "
        f"{args.n_test} test subjects per domain (seed {TEST_SEED}), {args.n_unseen} unseen "
        f"(seed {UNSEEN_SEED}); "
        f"refinement: Adam lr {args.refine_lr:g}"
        + (
            " (batch-norm statistics only, the plain mean of the refinement's batch statistics)"
            if args.refine_lr == 0 and args.statistics_average == "cumulative"
            else " (batch-norm statistics only, the authors' momentum average; no stop before "
            f"{defaults.REFINE_MIN_STATISTICS_STEPS} BN steps)"
            if args.refine_lr == 0
            else ""
        )
        + ", batch 20, stop at |ΔDice| < 0.005, at most "
        f"{args.refine_epochs} epochs; guard at the defaults of `sitefit/defaults.py`. Surface "
        "Dice at 1 mm vs ground truth, mean over subjects (multi-class: mean over classes). "
        "*one-shot* is the product's output (guarded); *unguarded* is the last epoch of the same "
        "refinement, i.e. the output with `SITEFIT_GUARD=false`.",
        "",
    ]
    for task, results in all_results.items():
        modes = args.batchnorm
        out += [
            f"#### Task `{task}`",
            "",
            "| domain | role | base sDice | "
            + " | ".join(
                f"one-shot sDice (BN {mode}) | unguarded (BN {mode}) | epochs (BN {mode})"
                for mode in modes
            )
            + " | guard reverted | base Dice | one-shot Dice | refine-on-N sDice | unseen: base | "
            "unseen: fixed adapted | unseen: one-shot | fixed / one-shot gain |",
            "|---|---|---|" + "---|---|---|" * len(modes) + "---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            cells = [r.domain, r.role, m(r.base)]
            for mode in modes:
                cells += [
                    f"{m(r.one_shot[mode])} ({gain(r.one_shot[mode], r.base):+.3f})",
                    f"{m(r.one_shot_last[mode])} ({gain(r.one_shot_last[mode], r.base):+.3f})",
                    f"{statistics.mean(r.one_shot_epochs[mode]):.1f}",
                ]
            cells += [
                f"{r.reverted}/{len(r.base)}",
                m(r.base_dice),
                m(r.one_shot_dice[modes[0]]),
                m(r.refine_on_n),
                m(r.unseen_base),
                m(r.unseen_fixed),
                m(r.unseen_one_shot),
                table3_share(r),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", *[f"- {line}" for line in verdicts(task, results, modes[0])], ""]
        out += confusion(task, results, modes[0])
        out += site_cache_table(task, results, modes[0])
    return "\n".join(out)


MIN_GAIN = 0.005  # a share of a smaller one-shot gain is noise


def table3_share(result: DomainResult) -> str:
    """The paper's Table 3 against its Table 2 on the same unseen scans: the share of each
    scan's own one-shot gain that the model refined once on the test scans keeps there."""
    if not result.unseen_one_shot:
        return "–"
    base = statistics.mean(result.unseen_base)
    one_shot = statistics.mean(result.unseen_one_shot) - base
    if one_shot < MIN_GAIN:
        return "n/a"
    return f"{(statistics.mean(result.unseen_fixed) - base) / one_shot:.0%}"


def on_cached_path(result: DomainResult, key: str) -> float:
    """Mean seconds per scan of ``key`` (a mode of the site-cache runs) on the scans where
    auto took the cached path (all of them when it never did); each run of the other modes
    was timed next to auto's on the same scan."""
    times = result.site_seconds[key]
    chosen = [t for t, p in zip(times, result.auto_paths, strict=True) if p == "cached"]
    return statistics.mean(chosen or times)


def site_cache_table(task: str, results: list[DomainResult], mode: str) -> list[str]:
    rows = [r for r in results if r.site]
    if not rows:
        return []
    out = [
        f"Site cache (issue 3), task `{task}`: adapt once on a scan of the site (seed "
        f"{SITE_SEED}; the version holds batch-norm statistics {ONE_SCAN_WEIGHT:.2f} of the way "
        "from the base model's to the scan's, `SITEFIT_SITE_STATISTICS_PRIOR`), then `cached` "
        f"on each of the {len(rows[0].site['cached'])} test scans "
        "above (all with that version), then `auto` on each in turn (it refines, and may save "
        "a new version, where it does not take the cached path); `one-shot` is each test scan "
        "refined on itself (the table above). *SC saved*: the self-consistency the site "
        "version reached on its own scan; *SC cached*: the cached weights' self-consistency on "
        "the test scans (mean, min-max), which `auto` compares with the threshold and with "
        "*SC saved* minus the margin. Seconds are the job's wall time per scan "
        "(the report's `timings_s.total` less `timings_s.reference`, the ground-truth comparison "
        "only the benchmark asks for); *s/scan adapt* is mode `adapt` for the site (warm-"
        "started from its latest version, saving the next one, on a copy of the site's store "
        "so that `auto` does not see them) and *s/scan one-shot* `adapt` without a site, both "
        "run on each test scan right after `auto` on it; *adapt / auto* and *one-shot / auto* "
        "compare them with `auto` on the scans where it took the cached path. "
        f"*cached, pooled*: `cached` on the same test scans from a version the site reached by "
        f"`adapt` on {POOLED_SCANS} of its scans in turn (seed {SITE_SEED}; the first is the "
        "scan above), whose batch-norm statistics pool those scans' with the base model's "
        "(`SITEFIT_SITE_STATISTICS`); *pooled scans*: how many the version pools (a scan "
        "whose pool does not raise self-consistency is not saved).",
        "",
        "| domain | base sDice | one-shot | cached | cached / one-shot gain | auto | auto paths "
        "| SC saved | SC cached (min-max) | s/scan adapt | s/scan one-shot | s/scan cached "
        "| s/scan auto (cached path) | adapt / auto | one-shot / auto "
        "| cached, pooled (gain kept) | pooled scans |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = []
    for r in rows:
        base, one = statistics.mean(r.base), statistics.mean(r.one_shot[mode])
        cached = statistics.mean(r.site["cached"])
        # a share of a gain under HELPFUL is noise (tissue b3t: +0.0002 once gave 48434%)
        kept = (cached - base) / (one - base) if one - base >= HELPFUL else float("nan")
        fast = "cached" in r.auto_paths
        fast_s = on_cached_path(r, "auto") if fast else float("nan")
        adapt_s, one_shot_s = on_cached_path(r, "adapt"), on_cached_path(r, "one_shot")
        paths = f"{r.auto_paths.count('cached')} cached / {r.auto_paths.count('adapt')} adapt"
        kept_text = "n/a (no one-shot gain)" if kept != kept else f"{kept:.0%}"
        speedup = f"{adapt_s / fast_s:.1f}x" if fast else "n/a (no cached path)"
        one_shot_speedup = f"{one_shot_s / fast_s:.1f}x" if fast else "n/a"
        sc = [v for v in r.site_consistency.get("cached", []) if v is not None]
        sc_text = f"{statistics.mean(sc):.3f} ({min(sc):.3f}-{max(sc):.3f})" if sc else "n/a"
        saved = r.site_saved_consistency
        pooled = r.site.get("cached_pooled", [])
        pooled_text = "n/a"
        if pooled:
            gained = one - base >= HELPFUL
            share = (statistics.mean(pooled) - base) / (one - base) if gained else None
            pooled_text = f"{statistics.mean(pooled):.3f}" + (
                f" ({share:.0%})" if share is not None else ""
            )
        out.append(
            f"| {r.domain} | {base:.3f} | {one:.3f} | {cached:.3f} | {kept_text} | "
            f"{statistics.mean(r.site['auto']):.3f} | {paths} | "
            f"{'n/a' if saved is None else f'{saved:.3f}'} | {sc_text} | {adapt_s:.1f} | "
            f"{one_shot_s:.1f} | {statistics.mean(r.site_seconds['cached']):.1f} | "
            f"{f'{fast_s:.1f}' if fast else 'n/a'} | {speedup} | {one_shot_speedup} | "
            f"{pooled_text} | "
            f"{r.pooled_scans} |"
        )
        verdict_gain = "n/a" if kept != kept else "PASS" if kept >= 0.8 else "FAIL"
        verdict_speed = "n/a" if not fast else "PASS" if adapt_s / fast_s >= 2 else "FAIL"
        lines.append(
            f"{task} {r.domain}: cached keeps {kept_text} of the one-shot gain (need >= 80%): "
            f"{verdict_gain}; auto on its cached path is {speedup} faster than adapt "
            f"(need >= 2x): {verdict_speed}; cached from the version pooled over "
            f"{r.pooled_scans} scans: {pooled_text}"
        )
    return [*out, "", *[f"- {line}" for line in lines], ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["brain", "heart", "tissue"])
    parser.add_argument("--n-train", type=int, default=6)
    parser.add_argument("--n-test", type=int, default=5)
    parser.add_argument("--n-unseen", type=int, default=5)
    parser.add_argument("--fov-mm", type=float, default=80.0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--head-epochs", type=int, default=6)
    parser.add_argument(
        "--head-statistics", choices=["scan", "source"], default=defaults.HEAD_STATISTICS
    )
    parser.add_argument(
        "--head-augmentation", choices=["intensity", "none"], default=defaults.HEAD_AUGMENTATION
    )
    parser.add_argument(
        "--site-first-save", choices=["beats_start", "guarded"], default=defaults.SITE_FIRST_SAVE
    )
    parser.add_argument("--refine-epochs", type=int, default=10)
    parser.add_argument(
        "--refine-lr",
        type=float,
        default=defaults.REFINE_LR,
        help="init-path learning rate (0: batch-norm statistics only)",
    )
    parser.add_argument(
        "--statistics-average",
        choices=["cumulative", "momentum"],
        default=defaults.REFINE_STATISTICS_AVERAGE,
        help="with --refine-lr 0: how the batch-norm running statistics follow the scan",
    )
    # BN "frozen" was measured worse (bench/refine_probe.py, docs/method.md): not by default
    parser.add_argument("--batchnorm", nargs="+", default=["train"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-tables13", action="store_true")
    parser.add_argument("--skip-site-cache", action="store_true")
    parser.add_argument(
        "--train-only", action="store_true", help="train (or find) the base models, then stop"
    )
    parser.add_argument("--tag", default="", help="suffix of the docs section (side studies)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.quick:
        args.n_train, args.n_test, args.n_unseen, args.fov_mm = 3, 2, 2, 48.0
        args.epochs, args.head_epochs, args.refine_epochs = 2, 1, 2
        args.work = args.work.parent / "bench-quick"
    for task in args.tasks:
        started = time.perf_counter()
        if args.train_only:
            base_model(task, args, BaseModelRegistry(args.work / "home" / "models"))
            continue
        results = {task: run_task(task, args)}
        text = markdown(results, args, time.perf_counter() - started)
        print(text)
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / f"adapt_quality-{task}{args.tag}.json").write_text(
            json.dumps([vars(r) for r in results[task]], indent=1, default=float)
        )
        if not args.quick:
            replace_section(
                args.out,
                f"adapt_quality-{task}{args.tag}",
                f"Adaptation quality, task `{task}`: "
                + (
                    f"the paper's init-path self-training (lr {args.refine_lr:g})"
                    if args.refine_lr != 0
                    else "the product default (batch-norm statistics, lr 0)"
                    if args.statistics_average == defaults.REFINE_STATISTICS_AVERAGE
                    else f"batch-norm statistics, lr 0, {args.statistics_average} average"
                )
                + side_options(args),
                text,
            )
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
