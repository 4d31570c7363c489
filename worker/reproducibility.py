"""The report's reproducibility record: what a job's mask came from, enough to make it again.

Everything the output depends on is named: the input (the sha256 of the scan file the
engine read), the weights (the base model's sha256, and the site version a job started from,
with its delta's sha256), the method (every setting that steers the site policy, the
refinement and the guard, under its ``Settings`` name, so ``SITEFIT_<NAME>`` sets it again;
the refinement's full configuration, constants included; the guard's thresholds as
applied), the seed of the refinement's slice shuffles (its one random draw), and the
software and device (versions, the device with its CPU thread count, the numerics chosen for
it, and whether torch's deterministic algorithms were on). What a job saved for its site is
named too: the next job starts from it. docs/api.md says how to reproduce a mask from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sitefit
from model_store.sites import SiteVersion
from model_store.spec import ModelSpec
from sitefit.report import Reproducibility
from sitefit.settings import Settings
from worker.guard import GuardConfig
from worker.inference import execution_for
from worker.refinement import RefineConfig

# the settings that decide a job's mask (and what it saves for its site), by Settings name
METHOD_SETTINGS = (
    "refine_max_epochs",
    "refine_lr",
    "refine_batch_size",
    "refine_batchnorm",
    "refine_statistics_average",
    "refine_statistics_passes",
    "refine_min_statistics_steps",
    "auto_threshold",
    "auto_margin",
    "site_statistics",
    "site_statistics_prior",
    "site_first_save",
    "guard",
    "guard_max_volume_change",
    "guard_min_agreement",
    "guard_min_consistency_gain",
    "guard_max_entropy_rise",
)
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (read in chunks: a scan may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def reproducibility_block(
    *,
    spec: ModelSpec,
    input_sha256: str,
    device: torch.device,
    device_name: str,
    settings: Settings,
    refine: RefineConfig,
    guard: GuardConfig,
    site_used: SiteVersion | None,
    site_saved: SiteVersion | None,
) -> Reproducibility:
    """``Report.reproducibility`` of one job (see the module docstring)."""
    execution = execution_for(device, refine.precision)
    numerics = "fp32" if execution.autocast is None else str(execution.autocast).split(".")[-1]
    if execution.channels_last:
        numerics += ", channels_last"
    return Reproducibility(
        base_sha256=spec.sha256,
        site_version=site_used.version if site_used else None,
        site_delta_sha256=site_used.sha256 if site_used else None,
        saved_site_version=site_saved.version if site_saved else None,
        saved_site_delta_sha256=site_saved.sha256 if site_saved else None,
        input_sha256=input_sha256,
        sitefit=sitefit.__version__,
        torch=torch.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        device=device_name,
        numerics=numerics,
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        settings={name: _plain(getattr(settings, name)) for name in METHOD_SETTINGS},
        refinement=_plain(dataclasses.asdict(refine)),
        guard=_plain(dataclasses.asdict(guard)),
        seeds={"refinement_shuffle": refine.seed},
    )


def _plain(value: Any) -> Any:
    """``value`` as JSON keeps it, so a stored report reads back equal: tuples as lists, and
    infinite thresholds (a check that is off) as "inf", which a setting parses again."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


__all__ = ["METHOD_SETTINGS", "file_sha256", "reproducibility_block"]
