"""What the deploy tests read: docker-compose.yml as Debian's docker-compose resolves it, and
YAML files, parsed by the YAML library docker-compose itself runs on (sitefit has none).

Helpers, not fixtures. A tool that is missing skips the test: `make test` installs them
(Debian's docker-compose and prometheus, for promtool).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = REPO / "docker-compose.yml"
PACS_ENV = DOCKER / "pacs.env"
PROFILES = ("cpu", "dicom", "pacs", "monitoring", "import")
API_KEYS = '{"deploy-test-key-0123456789": ["*"]}'
# what the stack reads from the environment of `docker compose`: never this shell's
_STACK_VARIABLES = ("SITEFIT_", "ORTHANC", "GRAFANA", "PROMETHEUS", "COMPOSE_")


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (`make test` installs Debian's {package})")
    return path


def compose(
    *args: str, env_file: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``docker-compose [--env-file F] --profile ... ARGS`` on the repository's file."""
    command = [tool("docker-compose", "docker-compose"), "--project-directory", str(REPO)]
    command += ["--file", str(COMPOSE_FILE)]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    for profile in PROFILES:
        command += ["--profile", profile]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(_STACK_VARIABLES)}
    environment.update(env or {})
    return subprocess.run(
        [*command, *args], env=environment, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def resolved_stack(env_file: Path | None = None) -> dict[str, Any]:
    """The stack with every profile, variables interpolated (``docker-compose config``)."""
    done = compose("config", env_file=env_file, env={"SITEFIT_API_KEYS": API_KEYS})
    assert done.returncode == 0, done.stderr
    stack: dict[str, Any] = load_yaml(done.stdout)
    return stack


def load_yaml(text: str) -> Any:
    """Parse YAML with the interpreter and library docker-compose runs on."""
    script = Path(tool("docker-compose", "docker-compose")).read_text().splitlines()[0]
    interpreter = script.removeprefix("#!").split()
    parse = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    done = subprocess.run(
        [*interpreter, "-c", parse], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
