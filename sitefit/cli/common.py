"""What every command area shares: its ``Settings``, and how figures are printed."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from sitefit.exceptions import InvalidInputError
from sitefit.settings import Settings


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from the ``SITEFIT_*`` environment, with the flags actually given on top.

    An override of ``None`` (a flag left out) is dropped rather than passed on: pydantic-settings
    treats any explicit value as set, so passing ``None`` would hide the environment variable.
    An invalid value, from a flag or the environment, becomes one ``InvalidInputError`` line
    naming where it came from; the CLI prints it as ``sitefit: error: ...``.
    """
    given: dict[str, Any] = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        errors = error.errors()
        first = errors[0]
        field = str(first["loc"][0]) if first["loc"] else None
        message = str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidInputError(
            f"invalid configuration ({_source(field, given)}): {message}{more}"
        ) from None
    except SettingsError as error:  # a value the environment source cannot decode (bad JSON)
        raise InvalidInputError(f"invalid configuration: {error}") from None


def _source(field: str | None, given: dict[str, Any]) -> str:
    if field is None:
        return "settings"
    if field in given:
        return "--" + field.replace("_", "-")
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def fmt(value: float | None) -> str:
    """A Dice-like figure with three decimals; ``n/a`` when there is none."""
    return "n/a" if value is None else f"{value:.3f}"


def output_file(path: Path, flag: str) -> Path:
    """``path`` if a file can be written there: checked before a long run, so that a typo
    costs one line, not the run's result. Its folder must exist; it must not be a folder."""
    if path.is_dir():
        raise InvalidInputError(f"{flag} {path}: is a folder; expected a file path")
    if not path.parent.is_dir():
        raise InvalidInputError(f"{flag} {path}: the folder {path.parent} does not exist")
    return path


def written(path: Path, flag: str, error: OSError) -> InvalidInputError:
    """One line for a failed write of an output file."""
    return InvalidInputError(f"{flag} {path}: cannot write ({error.strerror or error})")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, not {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, not {text}")
    return value
