"""Durable, atomic file writes, shared by everything that writes files another process may
read (job store, model store, uploads, NIfTI output, phantoms, benchmark reports).

A reader sees a file whole or not at all: it is written under a hidden temporary name in
its folder, fsynced, and renamed (or linked, for a write that must not replace) onto its
name; then the folder is fsynced, so that the name survives a crash too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(
    path: Path, *, suffix: str = "", mode: int | None = None, exclusive: bool = False
) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to create its file at.

    On a clean exit the file is fsynced and published at ``path``: renamed onto it, or, with
    ``exclusive``, linked there only if ``path`` does not exist yet (``FileExistsError``
    otherwise); ``mode`` (e.g. 0o640) is set first. On any error the temporary file is
    removed and the error propagates. The temporary name starts with a dot (listings skip
    it) and ends with ``suffix`` (nibabel chooses compression from the name). The folder
    must exist: a write never recreates a folder another process deleted.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}")
    try:
        yield temporary
        if mode is not None:
            os.chmod(temporary, mode)
        _fsync_file(temporary)
        if exclusive:
            os.link(temporary, path)
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(
    path: Path, data: bytes, *, mode: int | None = None, exclusive: bool = False
) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path` (same arguments)."""
    # the file closes before atomic_path fsyncs and publishes it
    with (
        atomic_path(path, mode=mode, exclusive=exclusive) as temporary,
        open(temporary, "xb") as handle,
    ):
        handle.write(data)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename into it) where the platform allows it.

    Best effort: some filesystems cannot fsync a directory, and by the time this runs the
    rename it persists has happened, so a failure here is not one of the write."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
