"""FilesystemBackend: atomic writes, exclusive publishing, listings, deletes, key safety."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from model_store.backend import FilesystemBackend
from sitefit.exceptions import ModelStoreError


def test_write_then_read_and_replace(tmp_path: Path) -> None:
    store = FilesystemBackend(tmp_path)
    store.write("a/b/c.bin", b"one")
    store.write("a/b/c.bin", b"two")
    assert store.read("a/b/c.bin") == b"two"
    assert store.exists("a/b/c.bin")
    assert os.listdir(tmp_path / "a" / "b") == ["c.bin"]  # no temporary file left behind


def test_missing_key_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="missing"):
        FilesystemBackend(tmp_path).read("nope/x")


def test_create_exclusive_is_a_compare_and_set(tmp_path: Path) -> None:
    store = FilesystemBackend(tmp_path)
    assert store.create_exclusive("s/m/1", {"f": b"first", "g": b"x"})
    assert not store.create_exclusive("s/m/1", {"f": b"second", "g": b"y"})
    assert store.read("s/m/1/f") == b"first"
    assert store.children("s/m") == ["1"]
    assert store.children("s/m/1") == ["f", "g"]
    assert not [p for p in (tmp_path / "s" / "m").iterdir() if p.name.startswith(".")]


def test_threads_racing_for_one_name_have_one_winner(tmp_path: Path) -> None:
    store = FilesystemBackend(tmp_path)
    start = threading.Barrier(8)
    results: list[bool] = []

    def race(i: int) -> None:
        start.wait()
        results.append(store.create_exclusive("site/model/1", {"who": str(i).encode()}))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.read("site/model/1/who").decode() in {str(i) for i in range(8)}


def test_retransmitted_rename_that_had_succeeded_counts_as_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename

    def rename_then_fail(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)  # NFS: the server did it, the reply was lost, the retry fails
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "rename", rename_then_fail)
    assert FilesystemBackend(tmp_path).create_exclusive("x/1", {"f": b"data"})


def test_a_vanished_staging_folder_and_another_writers_version_count_as_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging folder can vanish without our rename (a sweep after a long stall) while
    another writer publishes the version: only our own bytes there would mean we won."""
    other = FilesystemBackend(tmp_path)

    def rename_after_a_stall(src: str | Path, dst: str | Path) -> None:
        shutil.rmtree(src)
        monkeypatch.undo()  # the other writer's publish renames for real
        assert other.create_exclusive("x/1", {"f": b"theirs"})
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "rename", rename_after_a_stall)
    assert not FilesystemBackend(tmp_path).create_exclusive("x/1", {"f": b"ours"})
    assert other.read("x/1/f") == b"theirs"


def test_children_hide_temporary_names_and_tolerate_missing(tmp_path: Path) -> None:
    store = FilesystemBackend(tmp_path)
    (tmp_path / "m" / ".staging-abc").mkdir(parents=True)
    (tmp_path / "m" / "2").mkdir()
    assert store.children("m") == ["2"]
    assert store.children("absent") == []
    assert store.children() == ["m"]


def test_delete_directory_and_file(tmp_path: Path) -> None:
    store = FilesystemBackend(tmp_path)
    store.create_exclusive("s/m/1", {"f": b"1"})
    store.write("s/other", b"2")
    assert store.delete("s/m")
    assert store.children("s") == ["other"]
    assert store.delete("s/other")
    assert not store.delete("s/other")
    assert store.children("s") == []


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a/./b", ".hidden", "a\\b"])
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        FilesystemBackend(tmp_path).read(key)


def test_root_cannot_be_deleted(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FilesystemBackend(tmp_path).delete("")


def test_sweep_removes_old_debris_of_interrupted_writes_only(tmp_path: Path) -> None:
    store = FilesystemBackend(tmp_path)
    store.create_exclusive("site/brain/1", {"f": b"published"})
    debris = [
        tmp_path / "site" / "brain" / ".staging-killed",  # a writer killed while staging
        tmp_path / ".deleted-gone-0123",  # a delete that could not remove its folder at once
        tmp_path / "site" / ".deleted-heart-4567",
    ]
    for folder in debris:
        folder.mkdir()
        (folder / "delta").write_bytes(b"x")
    (tmp_path / "site" / "brain" / ".meta.json.abc.tmp").write_bytes(b"x")
    kept = [
        tmp_path / "site" / "brain" / ".staging-in-progress",  # young: a writer is at it
        tmp_path / "site" / ".foreign-hidden",  # not ours
    ]
    for folder in kept:
        folder.mkdir()
    old = time.time() - 7200
    for path in [*debris, tmp_path / "site" / "brain" / ".meta.json.abc.tmp", kept[1]]:
        os.utime(path, (old, old))
    assert store.sweep(3600) == 4
    assert all(path.exists() for path in kept) and not any(path.exists() for path in debris)
    assert store.read("site/brain/1/f") == b"published" and store.sweep(3600) == 0
