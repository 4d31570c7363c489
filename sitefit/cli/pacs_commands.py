"""PACS commands: ``sitefit deliveries list|resend``, results sent to PACS destinations.

They work on the delivery store under ``--home`` (default ``$SITEFIT_HOME``) directly, so no
server needs to run: a resent delivery is picked up by the API's delivery loop. ``--json``
prints machine-readable output instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sitefit.cli.common import load_settings
from sitefit.deliveries import STATUSES, Delivery, DeliveryStore
from sitefit.exceptions import InvalidInputError, SitefitError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: Subparsers) -> None:
    group = subparsers.add_parser(
        "deliveries", help="results sent to PACS destinations: list, resend failed ones"
    )
    actions = group.add_subparsers(dest="deliveries_command", required=True, metavar="ACTION")
    cmd = _command(actions, "list", "list deliveries, newest first", deliveries_list)
    cmd.add_argument("--status", choices=STATUSES, help="only these (failed: the dead-letter list)")
    cmd = _command(
        actions, "resend", "send failed deliveries again (their tries start over)", resend
    )
    cmd.add_argument("ids", nargs="*", metavar="ID", help="delivery ids (see `list`)")
    cmd.add_argument("--all-failed", action="store_true", help="every failed delivery")


def _command(
    group: Subparsers, name: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--home", type=Path, help="data root (default: $SITEFIT_HOME)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=handler)
    return parser


def _store(args: argparse.Namespace) -> DeliveryStore:
    return DeliveryStore.from_settings(load_settings(home=args.home))


def deliveries_list(args: argparse.Namespace) -> int:
    found = _store(args).records(args.status)
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in found], indent=2))
    elif not found:
        print(f"no {args.status} deliveries" if args.status else "no deliveries")
    else:
        print("\n".join(_table(found)))
    return 0


def resend(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_failed):
        raise InvalidInputError("give delivery ids or --all-failed (not both)")
    store = _store(args)
    ids = [d.id for d in store.records("failed")] if args.all_failed else args.ids
    resent: list[Delivery] = []
    errors = 0
    for delivery_id in ids:
        try:
            resent.append(store.resend(delivery_id))
        except SitefitError as error:  # unknown, or not failed: say so, go on with the rest
            print(f"sitefit: error: {error}", file=sys.stderr)
            errors += 1
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in resent], indent=2))
    else:
        for delivery in resent:
            print(f"resent {delivery.id} (job {delivery.job_id} to {delivery.destination})")
        if args.all_failed and not ids:
            print("no failed deliveries")
    return 1 if errors else 0


_COLUMNS = ("ID", "JOB", "DESTINATION", "STATUS", "TRIES", "UPDATED", "LAST ERROR")


def _table(deliveries: list[Delivery]) -> list[str]:
    rows = [
        (
            d.id,
            d.job_id,
            d.destination,
            d.status,
            str(d.attempts),
            f"{datetime.fromtimestamp(d.updated_at, UTC):%Y-%m-%d %H:%M:%S}",
            d.last_error or "",
        )
        for d in deliveries
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS) - 1)]
    return [
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        for row in [_COLUMNS, *rows]
    ]
