"""Crash- and concurrency-safe file primitives for the model store.

Every write goes to a temporary name in the destination's directory, is flushed and fsynced,
and is then renamed into place, so a reader sees either the old file or the whole new one —
on a local disk and on NFS alike. Directories are published the same way: a version directory
is filled under a temporary name (``staging_dir``) and renamed to its final name by the
backend; ``os.rename`` onto an existing non-empty directory fails, which makes "create
version N" a compare-and-set.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sitefit.durable import fsync_dir


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A temporary directory under ``parent`` that is removed unless it was renamed away."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()
