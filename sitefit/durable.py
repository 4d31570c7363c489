"""fsync helpers shared by everything that writes files another process may read.

A write is durable only when the file's data and the directory entry naming it are both on
disk: the writers (model store, job store, uploads, NIfTI output) fsync the file before the
rename that publishes it and the directory after.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename into it) where the platform allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
