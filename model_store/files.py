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
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sitefit.durable import write_atomic


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_mode(directory: bool = False) -> int:
    """The mode ``open`` or ``mkdir`` would give a new file or directory under the umask
    (``mkstemp`` and ``mkdtemp`` make them private to the writer instead, which a store
    shared by several accounts, e.g. a service and its operators, cannot read)."""
    return (0o777 if directory else 0o666) & ~_umask()


@functools.cache
def _umask() -> int:
    # read, not set: setting it to read it would race with other threads creating files
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (not Linux): once per process
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file (creating the
    folders above it: the store's own layout, unlike the job store's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


@contextlib.contextmanager
def staging_dir(parent: Path, create: bool = True) -> Iterator[Path]:
    """A temporary directory under ``parent`` (created first when ``create``; otherwise a
    missing parent raises ``FileNotFoundError``) that is removed unless it was renamed away.
    It gets the mode a plain ``mkdir`` would, since it becomes a published directory."""
    if create:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    tmp.chmod(default_mode(directory=True))
    try:
        yield tmp
    finally:
        if tmp.exists():
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()
