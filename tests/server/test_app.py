"""server.app: the maintenance pass."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.app import create_app, maintain_once
from sitefit import defaults
from tests.server.helpers import service_settings


def test_maintenance_removes_what_killed_writers_left_in_the_model_store(
    tmp_path: Path,
) -> None:
    settings = service_settings(tmp_path)
    services = create_app(settings).state.services  # no lifespan: the queue is not started
    staged = [
        settings.sites_dir / "site" / "brain" / ".staging-killed",
        settings.models_dir / "brain" / ".staging-killed",
    ]
    long_ago = time.time() - 2 * defaults.STORE_DEBRIS_AGE_S
    for folder in staged:
        folder.mkdir(parents=True)
        os.utime(folder, (long_ago, long_ago))
    maintain_once(services)
    assert not any(folder.exists() for folder in staged)
    assert all(folder.parent.is_dir() for folder in staged)
