"""The ``sitefit`` command: one sub-command module per area, errors as one line.

Each area module exposes ``register(subparsers)``, adding its commands with a ``handler``
default. Handlers import torch-heavy modules lazily, so ``sitefit --help`` and the service
commands stay fast. A ``SitefitError`` is printed as ``sitefit: error: ...`` with exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import sitefit
from sitefit.cli import engine_commands, pacs_commands, service_commands, store_commands
from sitefit.exceptions import SitefitError

AREAS = [engine_commands, store_commands, service_commands, pacs_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sitefit",
        description="Segmentation that adapts its early U-Net layers to each scanner site.",
    )
    parser.add_argument("--version", action="version", version=f"sitefit {sitefit.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except SitefitError as error:
        print(f"sitefit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sitefit: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
