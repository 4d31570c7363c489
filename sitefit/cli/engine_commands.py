"""Engine commands: ``phantoms``, ``train``, ``segment`` and ``demo`` (the ``make run`` job)."""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sitefit import defaults
from sitefit.cli.common import (
    fmt,
    load_settings,
    output_file,
    positive_float,
    positive_int,
    written,
)
from sitefit.exceptions import InvalidInputError, ModelNotFoundError
from sitefit.report import MODES, Report

if TYPE_CHECKING:
    from worker.engine import Progress

DEMO_MODEL = "demo-brain"
DEMO_TASK = "brain"
DEMO_TARGET_DOMAIN = "d3t"
# a 64 mm field of view and four epochs: the demo model trains in about two minutes on two
# CPU cores, and one-shot adaptation still raises its surface Dice on d3t scans (README)
DEMO_FOV_MM = 64.0
DEMO_EPOCHS = DEMO_HEAD_EPOCHS = 4


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    phantoms = subparsers.add_parser("phantoms", help="write a synthetic scanner dataset")
    phantoms.add_argument("--task", default="brain", help="brain, heart or tissue")
    phantoms.add_argument("--domain", help="scanner domain (see --list-domains)")
    phantoms.add_argument("--n", type=int, default=5, help="number of subjects")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--fov-mm", type=float, default=None, help="field of view in mm")
    phantoms.add_argument("--out", type=Path, help="output directory (nnU-Net v2 raw layout)")
    phantoms.add_argument("--list-domains", action="store_true", help="list scanner domains")
    phantoms.add_argument(
        "--dicom",
        action="store_true",
        help="also write each scan as a single-frame MR DICOM series under OUT/dicom/CASE "
        "(scanner headers per domain: one site key per domain)",
    )
    phantoms.set_defaults(handler=run_phantoms)

    train = subparsers.add_parser("train", help="train a base model on an nnU-Net v2 dataset")
    train.add_argument("dataset", type=Path, help="nnU-Net v2 raw dataset directory")
    train.add_argument("--name", required=True, help="model name in the store")
    train.add_argument("--epochs", type=positive_int, default=defaults.TRAIN_EPOCHS)
    train.add_argument("--head-epochs", type=positive_int, default=defaults.HEAD_EPOCHS)
    train.add_argument("--batch-size", type=positive_int, default=defaults.TRAIN_BATCH_SIZE)
    train.add_argument(
        "--lr", type=positive_float, default=defaults.TRAIN_LR, help="U-Net learning rate"
    )
    train.add_argument(
        "--head-lr", type=positive_float, default=defaults.HEAD_LR, help="early head learning rate"
    )
    train.add_argument(
        "--head-statistics",
        choices=["scan", "source"],
        default=defaults.HEAD_STATISTICS,
        help="BN statistics the early head is trained under: each training scan's own, or the "
        "source's running statistics",
    )
    train.add_argument(
        "--head-augmentation",
        choices=["intensity", "none"],
        default=defaults.HEAD_AUGMENTATION,
        help="re-image the early head's training slices as another scanner might",
    )
    train.add_argument("--seed", type=int, default=defaults.SEED)
    train.add_argument("--base-channels", type=positive_int, default=defaults.BASE_CHANNELS)
    train.add_argument("--slice-axis", type=int, default=2, help="canonical (RAS) axis, 0-2")
    train.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    train.set_defaults(handler=run_train)

    segment = subparsers.add_parser("segment", help="segment one scan locally (no services)")
    segment.add_argument(
        "scan",
        type=Path,
        help="NIfTI scan (.nii or .nii.gz), or a DICOM series: a folder of its instances or a zip",
    )
    segment.add_argument("--model", required=True, help="NAME or NAME@VERSION")
    segment.add_argument("--site", default=None, help="scanner site the scan comes from")
    segment.add_argument("--mode", choices=MODES, default="auto")
    segment.add_argument("--out", type=Path, required=True, help="mask to write (.nii.gz)")
    segment.add_argument("--reference", type=Path, help="ground-truth labels, for figures")
    segment.add_argument("--report", type=Path, help="write the JSON report here")
    segment.add_argument(
        "--seg", type=Path, help="write a DICOM SEG of the mask here (DICOM series input only)"
    )
    segment.add_argument(
        "--preview",
        type=Path,
        help="write a PNG preview here: slices with the mask's outline (and the base model's "
        "where it differs)",
    )
    segment.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    segment.add_argument("--quiet", action="store_true", help="print no progress")
    segment.set_defaults(handler=run_segment)

    demo = subparsers.add_parser(
        "demo", help="build the demo model from phantoms if missing, then segment a shifted scan"
    )
    demo.add_argument("--device", default=None)
    demo.set_defaults(handler=run_demo)


def run_phantoms(args: argparse.Namespace) -> int:
    from sitefit.phantoms import list_domains, write_dataset

    if args.list_domains:
        print(list_domains())
        return 0
    if args.domain is None or args.out is None:
        raise InvalidInputError("phantoms needs --domain and --out (or --list-domains)")
    out = write_dataset(args.task, args.domain, args.n, args.seed, args.out, args.fov_mm)
    print(f"wrote {args.n} {args.task} subject(s) of domain {args.domain} to {out}")
    if args.dicom:
        from sitefit.phantoms.dicom_series import Scanner, write_dicom_series

        scanner = Scanner(model=f"Simulator {args.domain}", serial=args.domain)
        for image in sorted((out / "imagesTr").glob("*_0000.nii.gz")):
            case = image.name.removesuffix("_0000.nii.gz")
            write_dicom_series(image, out / "dicom" / case, scanner=scanner)
        print(f"wrote their DICOM series to {out / 'dicom'}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from model_store.base_models import BaseModelRegistry
    from worker.device import resolve_device
    from worker.training import TrainConfig, train_base_model

    settings = load_settings(device=args.device)
    config = TrainConfig(
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        head_learning_rate=args.head_lr,
        head_statistics=args.head_statistics,
        head_augmentation=args.head_augmentation,
        seed=args.seed,
        base_channels=args.base_channels,
        slice_axis=args.slice_axis,
    )
    device = resolve_device(settings.device)
    registry = BaseModelRegistry(settings.models_dir)
    train_base_model(args.dataset, args.name, config, registry, device, log=_log)
    return 0


def run_segment(args: argparse.Namespace) -> int:
    import tempfile

    from worker.engine import Engine, SegmentRequest

    if not str(args.out).endswith((".nii", ".nii.gz")):
        raise InvalidInputError(f"--out {args.out}: the mask is written as .nii or .nii.gz")
    output_file(args.out, "--out")
    if args.report:
        output_file(args.report, "--report")
    if args.preview:
        output_file(args.preview, "--preview")
        if args.preview.suffix.lower() != ".png":
            raise InvalidInputError(f"--preview {args.preview}: the preview is written as .png")
    dicom = args.scan.is_dir() or zipfile.is_zipfile(args.scan)
    if args.seg:
        output_file(args.seg, "--seg")
        if not dicom:
            raise InvalidInputError(
                f"--seg {args.seg}: a DICOM SEG needs a DICOM series as SCAN (a folder of its "
                "instances or a zip), not a NIfTI file"
            )
    settings = load_settings(device=args.device)
    engine = Engine(settings)
    with tempfile.TemporaryDirectory(prefix="sitefit-segment-") as temporary:
        scan, source = args.scan, None
        if dicom:
            scan, source = _convert_series(args.scan, Path(temporary), settings.max_voxels)
            if not args.quiet:
                _log("  converted the DICOM series to NIfTI")
        request = SegmentRequest(scan, args.model, args.site, args.mode, args.reference)
        result = engine.run(request, progress=None if args.quiet else _progress_printer())
        seg = None
        if args.seg and source is not None:  # built before any output is written
            from sitefit.seg import SegDescription, build_seg, segments_of

            seg = build_seg(
                result.mask,
                source,
                segments_of(result.spec.classes, result.spec.codes),
                description=SegDescription.of(result.report),
                omit_empty_frames=result.seg_omit_empty_frames,
            )
    preview = None
    if args.preview and result.preview is not None:  # rendered before any output is written
        from worker.preview import render_preview

        try:
            preview = render_preview(result.preview)
        except Exception as error:  # as in a job: a missing picture costs no mask
            name = type(error).__name__
            result.report.warnings.append(f"no preview: it could not be rendered ({name})")
    from sitefit.volume import save_image_atomic

    try:
        save_image_atomic(result.mask, args.out)
    except OSError as error:
        raise written(args.out, "--out", error) from None
    if args.report:
        try:
            _write_json_atomic(args.report, result.report.model_dump(mode="json"))
        except OSError as error:
            raise written(args.report, "--report", error) from None
    if seg is not None:
        from sitefit.durable import write_atomic
        from sitefit.job_store import JOB_FILE_MODE
        from sitefit.seg import seg_bytes

        try:  # it holds the series' patient module: not world-readable
            write_atomic(args.seg, seg_bytes(seg), mode=JOB_FILE_MODE)
        except OSError as error:
            raise written(args.seg, "--seg", error) from None
    if preview is not None:
        from sitefit.durable import write_atomic

        try:
            write_atomic(args.preview, preview)
        except OSError as error:
            raise written(args.preview, "--preview", error) from None
    print(summarize(result.report))
    outputs = [f"mask: {args.out}"]
    outputs += [f"report: {args.report}"] if args.report else []
    outputs += [f"preview: {args.preview}"] if preview is not None else []
    outputs += [f"seg: {args.seg}"] if seg is not None else []
    print("  ".join(outputs))
    return 0


def _convert_series(scan: Path, temporary: Path, max_voxels: int) -> tuple[Path, Path]:
    """A DICOM series (a folder of instances, or a zip extracted into ``temporary``) as a
    NIfTI file in ``temporary``; returns it and the folder of the series' instances."""
    from sitefit.dicom import extract_series_zip, series_dir_to_nifti

    source = scan
    if not scan.is_dir():
        source = temporary / "dicom"
        extract_series_zip(scan, source, max_voxels)
    nifti = temporary / "scan.nii.gz"
    series_dir_to_nifti(source, nifti, max_voxels)
    return nifti, source


def run_demo(args: argparse.Namespace) -> int:
    """The ``make run`` job: a demo model from phantoms, then one shifted scan, adapted."""
    from model_store.base_models import BaseModelRegistry
    from sitefit.phantoms import DOMAINS, write_dataset
    from worker.engine import Engine, SegmentRequest
    from worker.training import TrainConfig, train_base_model

    settings = load_settings(device=args.device)
    registry = BaseModelRegistry(settings.models_dir)
    demo_dir = settings.home / "demo"
    source = next(name for name, domain in DOMAINS.items() if domain.role == "source")
    try:
        registry.spec(DEMO_MODEL)
        _log(f"demo model {DEMO_MODEL} found in {settings.models_dir}")
    except ModelNotFoundError:
        _log(f"building the demo model {DEMO_MODEL} from {source} phantoms (about 2 min on CPU)")
        data = write_dataset(
            DEMO_TASK, source, 8, 0, demo_dir / f"{DEMO_TASK}-{source}", DEMO_FOV_MM
        )
        from worker.device import resolve_device

        train_base_model(
            data,
            DEMO_MODEL,
            TrainConfig(epochs=DEMO_EPOCHS, head_epochs=DEMO_HEAD_EPOCHS),
            registry,
            resolve_device(settings.device),
            log=_log,
        )
    target = write_dataset(DEMO_TASK, DEMO_TARGET_DOMAIN, 1, 1000, demo_dir / "target", DEMO_FOV_MM)
    scan = next((target / "imagesTr").iterdir())
    label = next((target / "labelsTr").iterdir())
    _log(f"segmenting {scan.name} (domain {DEMO_TARGET_DOMAIN}) with one-shot refinement")
    result = Engine(settings).run(
        SegmentRequest(scan, DEMO_MODEL, DEMO_TARGET_DOMAIN, "adapt", label), _progress_printer()
    )
    from sitefit.volume import save_image_atomic

    out = demo_dir / "mask.nii.gz"
    save_image_atomic(result.mask, out)
    _write_json_atomic(demo_dir / "report.json", result.report.model_dump(mode="json"))
    print(summarize(result.report))
    print(f"mask: {out}  report: {demo_dir / 'report.json'}")
    return 0


def summarize(report: Report) -> str:
    """The before/after figures of a report, a few lines for a terminal."""

    def pair(before: float | None, after: float | None) -> str:
        return f"{fmt(before)} -> {fmt(after)}"

    sc = report.self_consistency
    lines = [
        f"model {report.model.name}@{report.model.version}, mode {report.mode_used} "
        f"({report.mode_reason}), {report.device}",
        f"self-consistency (early vs final)  surface Dice "
        f"{pair(sc.before.surface_dice, sc.after.surface_dice)}   "
        f"Dice {pair(sc.before.dice, sc.after.dice)}",
        f"base vs adapted agreement          surface Dice "
        f"{fmt(report.agreement_base_vs_adapted.surface_dice)}",
    ]
    if report.reference is not None:
        ref = report.reference
        lines.append(
            f"reference (ground truth)           surface Dice "
            f"{pair(ref.before.surface_dice, ref.after.surface_dice)}   "
            f"Dice {pair(ref.before.dice, ref.after.dice)}"
        )
        if ref.last_epoch is not None and ref.last_epoch != ref.after:
            lines.append(
                f"reference, last epoch (unguarded)  surface Dice "
                f"{fmt(ref.last_epoch.surface_dice)}   Dice {fmt(ref.last_epoch.dice)}"
            )
    refinement = report.refinement
    if refinement.stopped != "skipped":
        trace = " ".join(f"{d:.3f}" for d in refinement.dice_trace)
        if refinement.statistics_average == "cumulative":
            lines.append(
                f"refinement: batch-norm statistics, {refinement.epochs} point(s) on the way "
                f"to the scan's; Dice(early, final) per point: {trace}"
            )
        else:
            lines.append(
                f"refinement: {refinement.epochs} epoch(s), {refinement.stopped}; "
                f"Dice(early, final) per epoch: {trace}"
            )
    if report.guard is not None:
        lines.append(f"guard: {report.guard.verdict} ({report.guard.reason})")
    t = report.timings_s
    lines.append(
        f"timings: load {t.load:.2f} s, adapt {t.adapt:.2f} s, segment {t.segment:.2f} s,"
        f" metrics {t.metrics:.2f} s, total {t.total:.2f} s"
    )
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress_printer() -> Callable[[Progress], None]:
    """One line per stage and refinement step (the engine reports the last step once more
    before it saves a site version: printed once)."""
    printed: set[int] = set()

    def print_progress(progress: Progress) -> None:
        if progress.stage == "adapting" and progress.epoch:
            if progress.epoch not in printed:
                printed.add(progress.epoch)
                trace = progress.dice_trace[-1]
                _log(f"  refinement step {progress.epoch}: Dice(early, final) {trace:.4f}")
        elif progress.stage not in ("loading", "done"):
            _log(f"  {progress.stage}")

    return print_progress


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    from sitefit.durable import write_atomic

    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())
