"""sitefit.durable: what a reader can see of a write, and what a failed write leaves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sitefit.durable import atomic_path, write_atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_bytes(b"old")
    write_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["record.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(b"old")
    with (
        pytest.raises(RuntimeError, match="writer failed"),
        atomic_path(path, suffix=".nii.gz") as temporary,
    ):
        assert temporary.name.startswith(".mask.nii.gz.") and temporary.name.endswith(".nii.gz")
        temporary.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["mask.nii.gz"]


def test_an_exclusive_write_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "final.json"
    write_atomic(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["final.json"]


def test_the_mode_is_set_and_a_missing_folder_is_not_created(tmp_path: Path) -> None:
    write_atomic(tmp_path / "job.json", b"{}", mode=0o640)
    assert stat.S_IMODE((tmp_path / "job.json").stat().st_mode) == 0o640
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "deleted-job" / "job.json", b"{}")
    assert not (tmp_path / "deleted-job").exists()
