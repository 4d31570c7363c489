"""The CLI's settings: ``SITEFIT_*`` variables count unless a flag is given; bad ones are one line.

Each case runs ``sitefit`` (or the settings helper) in a child process with its own
environment, so no test changes this process's environment or globals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sitefit.cli import main

REPO = Path(__file__).resolve().parents[3]


def _env(home: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SITEFIT_HOME=str(home))
    env.update(variables)
    return env


def _sitefit(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sitefit", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("sitefit: error: "), done.stderr
    return lines[0]


def test_device_comes_from_the_environment_unless_a_flag_is_given(tmp_path: Path) -> None:
    script = (
        "import json\n"
        "from sitefit.cli.common import load_settings\n"
        "print(json.dumps([load_settings(device=None).device, load_settings().device,"
        " load_settings(device='cuda').device, str(load_settings(home=None).home)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(tmp_path, SITEFIT_DEVICE="cpu"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == ["cpu", "cpu", "cuda", str(tmp_path)]


def test_segment_uses_sitefit_device(tmp_path: Path) -> None:
    scan, out = tmp_path / "none.nii.gz", tmp_path / "mask.nii.gz"
    argv = ["segment", str(scan), "--model", "x", "--out", str(out), "--quiet"]
    # No GPU has index 99: the engine refuses the device named only in the environment.
    line = _one_error_line(_sitefit(_env(tmp_path, SITEFIT_DEVICE="cuda:99"), *argv))
    assert "'cuda:99'" in line
    # --device wins over the environment: the run gets past the device, to the unknown model.
    line = _one_error_line(
        _sitefit(_env(tmp_path, SITEFIT_DEVICE="cuda:99"), *argv, "--device", "cpu")
    )
    assert "cuda:99" not in line and "unknown model 'x'" in line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SITEFIT_REFINE_BATCH_SIZE", "abc", "(SITEFIT_REFINE_BATCH_SIZE): Input should be"),
        ("SITEFIT_DEVICE", "gpu", "(SITEFIT_DEVICE): device must be"),
        ("SITEFIT_API_KEYS", "{not json", 'field "api_keys"'),
    ],
)
def test_malformed_environment_is_one_line(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    line = _one_error_line(_sitefit(_env(tmp_path, **{variable: value}), "models", "list"))
    assert line.startswith("sitefit: error: invalid configuration") and expected in line
    if variable == "SITEFIT_API_KEYS":
        assert value not in line  # keys are secrets: never echoed


def test_bad_device_flag_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["segment", str(tmp_path / "s.nii.gz"), "--model", "x", "--out", "m.nii.gz"]
    assert main([*argv, "--device", "gpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sitefit: error: invalid configuration (--device): "
        "device must be 'cpu', 'cuda' or 'cuda:N', not 'gpu'"
    ]
