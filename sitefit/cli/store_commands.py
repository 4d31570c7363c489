"""Model-store commands: ``sitefit models list|show|import|export`` and
``sitefit sites list|show|history|rollback|delete``.

Every command takes ``--home`` (default ``$SITEFIT_HOME``); ``--json`` prints machine-readable
output instead of the human-readable lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sitefit.cli.common import fmt, load_settings
from sitefit.exceptions import InvalidInputError, SitefitError, SiteNotFoundError

if TYPE_CHECKING:
    from model_store import ModelStore
    from model_store.base_models import Tensors, UnreadableModel
    from model_store.sites import SiteVersion, UnreadableVersion
    from model_store.spec import ModelSpec

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: Subparsers) -> None:
    models = subparsers.add_parser("models", help="list, show, import and export base models")
    model_cmds = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    cmd = _command(model_cmds, "list", "list base models and their versions", models_list)
    cmd = _command(model_cmds, "show", "show a base model's spec", models_show)
    cmd.add_argument("ref", metavar="NAME[@VERSION]")
    cmd = _command(
        model_cmds, "import", "register an exported model as a new version", models_import
    )
    cmd.add_argument("path", type=Path, help="export tar file (or a directory with its files)")
    cmd = _command(model_cmds, "export", "write a base model to one tar file", models_export)
    cmd.add_argument("ref", metavar="NAME[@VERSION]")
    cmd.add_argument("path", type=Path, help="tar file to write")
    cmd.add_argument("--force", action="store_true", help="overwrite an existing file")

    sites = subparsers.add_parser("sites", help="inspect, roll back and delete site weights")
    site_cmds = sites.add_subparsers(dest="sites_command", required=True, metavar="ACTION")
    _command(site_cmds, "list", "list sites with adapted weights", sites_list)
    cmd = _command(site_cmds, "show", "a site's latest version per model", sites_show)
    cmd.add_argument("site")
    cmd = _command(site_cmds, "history", "every saved version of a site", sites_history)
    cmd.add_argument("site")
    cmd.add_argument("--model", help="only this base model")
    cmd = _command(site_cmds, "rollback", "save an earlier version as the newest", sites_rollback)
    cmd.add_argument("site")
    cmd.add_argument("--model", required=True, help="base model name")
    cmd.add_argument("--version", type=int, required=True, help="version to restore")
    cmd = _command(site_cmds, "delete", "delete a site's adapted weights", sites_delete)
    cmd.add_argument("site")
    cmd.add_argument("--model", help="only this base model's versions")
    cmd.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _command(
    group: Subparsers, name: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--home", type=Path, help="store root (default: $SITEFIT_HOME)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=handler)
    return parser


def _store(args: argparse.Namespace) -> ModelStore:
    from model_store import ModelStore

    return ModelStore.from_settings(load_settings(home=args.home))


def _emit(args: argparse.Namespace, payload: Any, lines: list[str]) -> int:
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(lines))
    return 0


# -- models ---------------------------------------------------------------------------------


def models_list(args: argparse.Namespace) -> int:
    unreadable: list[UnreadableModel] = []
    rows = _store(args).models.catalog(unreadable=unreadable)
    for bad in unreadable:
        print(f"sitefit: warning: {bad.reason}", file=sys.stderr)
    payload = [
        {"name": s.name, "versions": v, "latest": s.model_dump(mode="json")} for s, v in rows
    ]
    lines = [_model_line(spec, versions) for spec, versions in rows] or ["no base models"]
    return _emit(args, payload, lines)


def models_show(args: argparse.Namespace) -> int:
    spec = _store(args).models.spec(args.ref)
    return _emit(args, spec.model_dump(mode="json"), _spec_lines(spec))


def models_import(args: argparse.Namespace) -> int:
    from worker.weights import check_fits  # torch: only this command builds the network

    def check(spec: ModelSpec, tensors: Tensors) -> None:
        check_fits(spec, tensors)
        spec.require_codes()  # a new model names each class's concept, for its DICOM SEGs

    spec = _store(args).import_(args.path, check=check)
    line = f"imported {spec.ref} (sha256 {spec.sha256[:12]}) from {args.path}"
    return _emit(args, spec.model_dump(mode="json"), [line])


def models_export(args: argparse.Namespace) -> int:
    spec = _store(args).export(args.ref, args.path, overwrite=args.force)
    line = f"exported {spec.ref} (sha256 {spec.sha256[:12]}) to {args.path}"
    return _emit(args, {"model": spec.model_dump(mode="json"), "path": str(args.path)}, [line])


def _model_line(spec: ModelSpec, versions: list[int]) -> str:
    classes = ", ".join(spec.foreground.values())
    return (
        f"{spec.name:24} latest {spec.version:<3} versions {_ranges(versions):10} "
        f"classes [{classes}]  created {spec.created:%Y-%m-%d %H:%M}"
    )


def _spec_lines(spec: ModelSpec) -> list[str]:
    arch, training, validation = spec.architecture, spec.training, spec.validation
    return [
        f"model        {spec.ref}",
        f"sha256       {spec.sha256}",
        f"created      {spec.created:%Y-%m-%d %H:%M:%S %Z} (sitefit {spec.sitefit_version})",
        f"classes      {', '.join(f'{k}: {v}' for k, v in sorted(spec.classes.items()))}",
        f"architecture outputs {arch.num_outputs}, base channels {arch.base_channels}, "
        f"levels {arch.levels}, res blocks {arch.res_blocks}; slice axis {spec.slice_axis}",
        f"training     {training.dataset_name}: {len(training.train_cases)} train / "
        f"{len(training.validation_cases)} validation cases, {training.epochs} epochs "
        f"(+{training.head_epochs} head), lr {training.learning_rate:g}, seed {training.seed}",
        f"validation   Dice final {fmt(validation.dice_final)}, early {fmt(validation.dice_early)}",
    ]


# -- sites ----------------------------------------------------------------------------------


def sites_list(args: argparse.Namespace) -> int:
    store = _store(args)
    payload: dict[str, dict[str, int]] = {}
    for site in store.sites.sites():
        latest = {m: store.sites.latest(site, m) for m in store.sites.models_of(site)}
        payload[site] = {m: v.version for m, v in latest.items() if v is not None}
    lines = [
        f"{site:24} " + ", ".join(f"{m}@{v}" for m, v in models.items())
        for site, models in payload.items()
    ]
    return _emit(args, payload, lines or ["no sites with adapted weights"])


def sites_show(args: argparse.Namespace) -> int:
    store = _store(args)
    models = store.sites.models_of(args.site)
    if not models:
        raise SiteNotFoundError(f"site {args.site!r} has no adapted weights")
    unreadable: list[UnreadableVersion] = []
    histories = {m: store.sites.history(args.site, m, unreadable=unreadable) for m in models}
    for bad in unreadable:  # the newest readable version is shown instead
        print(f"sitefit: warning: {bad.reason}", file=sys.stderr)
    latest = [versions[-1] for versions in histories.values() if versions]
    lines = [f"site {args.site}"]
    for meta in latest:
        count = len(store.sites.versions(args.site, meta.model))
        lines.append(f"  {meta.model}: {count} version(s), latest readable:")
        lines.extend(f"    {line}" for line in _version_lines(meta))
    payload = {"site": args.site, "latest": [m.model_dump(mode="json") for m in latest]}
    return _emit(args, payload, lines) if latest else 1


def sites_history(args: argparse.Namespace) -> int:
    store = _store(args)
    models = [args.model] if args.model else store.sites.models_of(args.site)
    unreadable: list[UnreadableVersion] = []
    history = [v for m in models for v in store.sites.history(args.site, m, unreadable=unreadable)]
    for bad in unreadable:  # one bad file must not hide the versions one may roll back to
        print(f"sitefit: warning: {bad.reason}", file=sys.stderr)
    if not history:
        if unreadable:
            return 1
        what = f" for model {args.model!r}" if args.model else ""
        raise SiteNotFoundError(f"site {args.site!r} has no adapted weights{what}")
    lines = [_history_line(meta) for meta in history]
    return _emit(args, [m.model_dump(mode="json") for m in history], lines)


def sites_rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    meta = store.sites.rollback(args.site, args.model, args.version)
    line = (
        f"site {meta.site} model {meta.model}: version {meta.version} now holds the weights "
        f"of version {args.version}"
    )
    with contextlib.suppress(SitefitError):  # no such base model any more: nothing to compare
        latest = store.models.spec(meta.model)
        if latest.sha256 != meta.base_sha256:
            print(
                f"sitefit: warning: these weights were adapted from {meta.model}@"
                f"{meta.base_version}, not the latest {latest.ref}: jobs on the latest will not "
                f"use them (they refine from the base model instead)",
                file=sys.stderr,
            )
    return _emit(args, meta.model_dump(mode="json"), [line])


def sites_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    what = f"site {args.site!r}" + (f" model {args.model!r}" if args.model else " (all models)")
    if not store.sites.models_of(args.site):
        raise SiteNotFoundError(f"site {args.site!r} has no adapted weights")
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInputError(f"refusing to delete {what} without --yes")
        try:
            answer = input(f"delete every saved version of {what}? [y/N] ")
        except EOFError:  # Ctrl-D: no answer is no
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    store.sites.delete(args.site, args.model)
    return _emit(args, {"deleted": args.site, "model": args.model}, [f"deleted {what}"])


def _version_lines(meta: SiteVersion) -> list[str]:
    rolled = f" (rollback of {meta.rolled_back_from})" if meta.rolled_back_from else ""
    return [
        f"version      {meta.version}{rolled}, created {meta.created:%Y-%m-%d %H:%M:%S %Z}",
        f"base model   {meta.model}@{meta.base_version} sha256 {meta.base_sha256[:12]}",
        f"delta        {meta.tensors} tensors, {meta.nbytes} bytes, sha256 {meta.sha256[:12]}",
        f"refinement   {meta.scans_refined} scan(s), {meta.refinement_epochs} epoch(s), "
        f"self-consistency {fmt(meta.self_consistency_before)} -> "
        f"{fmt(meta.self_consistency_after)} (sitefit {meta.sitefit_version})",
        *([f"saved by job  {meta.job_id}"] if meta.job_id else []),
    ]


def _history_line(meta: SiteVersion) -> str:
    rolled = f"  rollback of {meta.rolled_back_from}" if meta.rolled_back_from else ""
    return (
        f"{meta.model}@{meta.version:<4} {meta.created:%Y-%m-%d %H:%M:%S}  "
        f"base {meta.base_sha256[:12]}  scans {meta.scans_refined:<3} "
        f"epochs {meta.refinement_epochs:<3} self-consistency "
        f"{fmt(meta.self_consistency_before)} -> {fmt(meta.self_consistency_after)}"
        f"  {meta.nbytes} B{rolled}"
    )


def _ranges(versions: list[int]) -> str:
    if not versions:
        return "-"
    return f"{versions[0]}" if len(versions) == 1 else f"{versions[0]}-{versions[-1]}"
