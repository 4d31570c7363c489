"""The storage interface of the model store, and its filesystem implementation.

The stores (base models, site deltas) only speak :class:`StorageBackend`, so an object-storage
backend can follow without touching them. Keys are ``/``-separated relative paths whose parts
are plain names (no ``.``/``..``, no leading dot: hidden names belong to the backend's own
temporary files). The contract, per operation:

- ``read(key)``: the whole object, or :class:`ModelStoreError` when it is missing/unreadable.
- ``write(key, data)``: atomic replace; a reader sees the old object or the whole new one.
- ``create_exclusive(prefix, files, parent_must_exist=False)``: publish a set of files under
  ``prefix`` all at once, only if ``prefix`` does not exist yet (and, with
  ``parent_must_exist``, only if its parent still does: a prefix deleted meanwhile stays
  deleted); ``False`` otherwise (lost a compare-and-set). On object storage: upload the
  files, then a conditional put (``If-None-Match: *``) of a marker.
- ``children(prefix)``: names directly under ``prefix`` (sorted; ``[]`` when there is none).
- ``delete(prefix)``: remove an object or everything under a prefix; ``False`` if none.
- ``sweep(older_than_s)``: remove what interrupted writes and deletes left behind (never
  visible to readers) once it is that old; returns how many. On object storage: abort
  incomplete uploads.

:class:`FilesystemBackend` is safe when several processes on one or more machines share the
directory (NFS included): files are written to a temporary name, fsynced and renamed; a
version directory is filled under a temporary name and renamed into place, and ``rename``
onto an existing directory fails, which makes publishing a compare-and-set on the name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from model_store.files import sha256_bytes, staging_dir, write_bytes_atomic
from sitefit.durable import fsync_dir
from sitefit.exceptions import ModelStoreError

CHECKSUM_SUFFIX = ".sha256"

SWEEP_DEPTH = 3  # SITE/MODEL/.staging-*: the deepest place the stores stage a version
DEBRIS_PREFIXES = (".staging-", ".deleted-")


class StorageBackend(Protocol):
    """Byte storage addressed by ``/``-separated keys (see the module docstring)."""

    def read(self, key: str) -> bytes: ...

    def write(self, key: str, data: bytes) -> None: ...

    def create_exclusive(
        self, prefix: str, files: Mapping[str, bytes], *, parent_must_exist: bool = False
    ) -> bool: ...

    def children(self, prefix: str = "") -> list[str]: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, prefix: str) -> bool: ...

    def sweep(self, older_than_s: float) -> int: ...

    def describe(self, key: str = "") -> str:
        """Where ``key`` lives, for messages (a path, a URL)."""
        ...


def split_key(key: str) -> list[str]:
    """The parts of a key; refuses anything that could leave the store or hit hidden files."""
    if key == "":
        return []
    parts = key.split("/")
    for part in parts:
        if not part or part in (".", "..") or part.startswith(".") or "\\" in part or "\0" in part:
            raise ValueError(f"invalid storage key {key!r}")
    return parts


class FilesystemBackend:
    """A :class:`StorageBackend` on a (possibly shared, NFS) directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root.joinpath(*split_key(key))

    def describe(self, key: str = "") -> str:
        return str(self.path(key))

    def read(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ModelStoreError(f"{path}: missing") from None
        except OSError as error:
            raise ModelStoreError(f"{path}: unreadable ({error.strerror})") from None

    def write(self, key: str, data: bytes) -> None:
        if not split_key(key):
            raise ValueError("cannot write to the store root")
        try:
            write_bytes_atomic(self.path(key), data)
        except OSError as error:
            raise ModelStoreError(f"{self.path(key)}: cannot write ({error.strerror})") from None

    def create_exclusive(
        self, prefix: str, files: Mapping[str, bytes], *, parent_must_exist: bool = False
    ) -> bool:
        """Publish ``files`` (flat names) as the directory ``prefix``, unless it exists (or,
        with ``parent_must_exist``, unless its parent is gone: the staging directory lives in
        the parent, so a parent deleted at any point before the rename fails the publish)."""
        parts = split_key(prefix)
        if not parts or not files:
            raise ValueError("create_exclusive needs a non-empty prefix and at least one file")
        for name in files:
            if len(split_key(name)) != 1:
                raise ValueError(f"invalid file name {name!r}: one key part expected")
        target = self.path(prefix)
        if target.exists():
            return False
        try:
            with staging_dir(target.parent, create=not parent_must_exist) as staged:
                for name, data in files.items():
                    _write_durable(staged / name, data)
                fsync_dir(staged)
                return _publish(staged, target, files)
        except OSError as error:
            if parent_must_exist and not target.parent.is_dir():
                return False  # deleted meanwhile (a tombstone took the staging directory)
            raise ModelStoreError(f"{target}: cannot publish ({error.strerror})") from None

    def children(self, prefix: str = "") -> list[str]:
        directory = self.path(prefix)
        try:
            names = [entry.name for entry in os.scandir(directory)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as error:
            raise ModelStoreError(f"{directory}: cannot list ({error.strerror})") from None
        return sorted(name for name in names if not name.startswith("."))

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, prefix: str) -> bool:
        """Remove a file or a whole directory; readers never see half of a directory.

        A directory is first renamed to a hidden tombstone (atomic, so it vanishes from
        listings at once), then removed; what cannot be removed (e.g. ``.nfs*`` files held
        open on another machine) stays hidden and is ignored by every listing.
        """
        parts = split_key(prefix)
        if not parts:
            raise ValueError("refusing to delete the store root")
        target = self.path(prefix)
        try:
            if target.is_dir():
                tomb = target.with_name(f".deleted-{target.name}-{uuid.uuid4().hex}")
                os.rename(target, tomb)
                fsync_dir(target.parent)
                shutil.rmtree(tomb, ignore_errors=True)
                return True
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            raise ModelStoreError(f"{target}: cannot delete ({error.strerror})") from None
        fsync_dir(target.parent)
        return True

    def sweep(self, older_than_s: float, now: float | None = None) -> int:
        """Remove staging folders, tombstones and temporary files (hidden names) untouched for
        ``older_than_s``: a writer killed while publishing, or a delete whose folder could
        not be removed at once, leaves them. Looks ``SWEEP_DEPTH`` levels down, where the
        stores publish (``SITE/MODEL/VERSION``, ``NAME/VERSION``)."""
        now = time.time() if now is None else now
        removed = 0
        folders = [self.root]
        for _ in range(SWEEP_DEPTH):
            below: list[Path] = []
            for folder in folders:
                try:
                    entries = list(os.scandir(folder))
                except OSError:
                    continue
                for entry in entries:
                    if not entry.name.startswith("."):
                        if entry.is_dir(follow_symlinks=False):
                            below.append(Path(entry.path))
                        continue
                    if not entry.name.startswith(DEBRIS_PREFIXES) and not entry.name.endswith(
                        ".tmp"
                    ):
                        continue  # another program's hidden file: not ours to remove
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                            if entry.is_dir(follow_symlinks=False):
                                shutil.rmtree(entry.path)
                            else:
                                os.unlink(entry.path)
                            removed += 1
            folders = below
        return removed


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(staged: Path, target: Path, files: Mapping[str, bytes]) -> bool:
    """Rename ``staged`` to ``target``: ``True`` if we did, ``False`` if ``target`` was taken."""
    try:
        os.rename(staged, target)
    except OSError as error:
        if not staged.exists() and _holds(target, files):
            # NFS: a retransmitted rename whose first attempt succeeded. The staging directory
            # can also vanish otherwise (a sweep after a long stall, a delete's tombstone)
            # while another writer publishes the target: only our own bytes there say we won.
            fsync_dir(target.parent)
            return True
        # the server refuses to rename onto an existing non-empty directory: trust its errno
        # rather than a (possibly cached) lookup of the target
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY) or target.exists():
            return False
        raise
    fsync_dir(target.parent)
    return True


def _holds(folder: Path, files: Mapping[str, bytes]) -> bool:
    """Whether ``folder`` holds exactly ``files``, byte for byte."""
    try:
        names = {entry.name for entry in os.scandir(folder)}
        return names == set(files) and all((folder / n).read_bytes() == files[n] for n in files)
    except OSError:
        return False


def with_checksum(files: Mapping[str, bytes], name: str) -> dict[str, bytes]:
    """``files`` plus the sidecar ``NAME.sha256`` holding the sha256 of ``files[name]``: the
    metadata that carries the other files' checksums is itself verified on every read
    (:func:`read_checked`)."""
    return {**files, name + CHECKSUM_SUFFIX: sha256_bytes(files[name]).encode()}


def read_checked(backend: StorageBackend, key: str) -> bytes:
    """``key``'s bytes, verified against its ``.sha256`` sidecar; a mismatch raises
    :class:`ModelStoreError`. Files published by builds before the sidecars have
    none and are read as they are."""
    data = backend.read(key)
    sidecar = key + CHECKSUM_SUFFIX
    if backend.exists(sidecar):
        expected = backend.read(sidecar).decode("ascii", errors="replace").strip()
        if expected != sha256_bytes(data):
            raise ModelStoreError(f"{backend.describe(key)}: fails its checksum (corrupt file)")
    return data


def backend_of(location: StorageBackend | Path | str) -> StorageBackend:
    """A backend for a path (``FilesystemBackend``), or the backend itself."""
    if isinstance(location, (Path, str)):
        return FilesystemBackend(Path(location))
    return location


if TYPE_CHECKING:
    _conforms: type[StorageBackend] = FilesystemBackend
