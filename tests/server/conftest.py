"""Fixtures of the service tests: a private Redis, per-test homes sharing the tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sitefit.settings import Settings
from tests.server.helpers import make_home
from tests.server.processes import RedisProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def service_home(tmp_path: Path, settings: Settings, brain_model: str) -> Path:
    return make_home(tmp_path, settings.models_dir)
