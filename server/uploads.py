"""Receiving a ``multipart/form-data`` upload straight to disk, in chunks, within limits.

The request body is parsed as it arrives (python-multipart's streaming parser); file parts
are written to the job's private staging directory chunk by chunk, so an upload is never held
whole in memory, and the request is refused as soon as it passes ``max_bytes`` (413), names a
file that is neither NIfTI nor a zip (415), or repeats or adds parts it should not (400).

A file part is stored under a fixed name chosen from its suffix (``scan.nii``,
``scan.nii.gz``, ``scan.zip``; ``reference.nii[.gz]``): the client's file name may hold PHI
and is never stored or logged. Once the body is complete, every stored file and the staging
directory are fsynced, so a job published by renaming that directory never has a torn scan.
Like the job store's files, stored files get ``JOB_FILE_MODE`` whatever the umask (the job
store gives the staging directory ``JOB_DIR_MODE``): an upload is a scan, not for other
accounts to read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import MalformedRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from sitefit.durable import fsync_dir
from sitefit.job_store import JOB_FILE_MODE, storage_error

FILE_PARTS = {"file": "scan", "reference": "reference"}
TEXT_PARTS = ("model", "site", "mode")
MAX_TEXT_BYTES = 256
SUFFIXES = {"file": (".nii.gz", ".nii", ".zip"), "reference": (".nii.gz", ".nii")}


@dataclass
class StoredFile:
    path: Path
    suffix: str  # ".nii", ".nii.gz" or ".zip"
    size: int = 0


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, StoredFile] = field(default_factory=dict)


def require_multipart(content_type: str | None) -> bytes:
    """The multipart boundary of a request's Content-Type; 415 for anything else."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1")[:60] or "none"
        raise UnsupportedMediaTypeError(
            f"content type {shown!r}: expected multipart/form-data with a 'file' part"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequestError("multipart/form-data without a boundary")
    return boundary


def _suffix(part: str, filename: str) -> str:
    lower = filename.lower()
    for suffix in SUFFIXES[part]:
        if lower.endswith(suffix):
            return suffix
    allowed = ", ".join(SUFFIXES[part])
    raise UnsupportedMediaTypeError(
        f"'{part}' part: unsupported file type; expected a file name ending in {allowed}"
    )


def _create(path: Path) -> BinaryIO:
    """Create ``path`` for writing, exclusively, with mode ``JOB_FILE_MODE`` exactly."""
    # created with the mode (never wider, not even while empty), then set exactly as the job
    # store sets its files: a strict umask must not hide the scan from the workers' group
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, JOB_FILE_MODE)
    try:
        os.fchmod(descriptor, JOB_FILE_MODE)
        return os.fdopen(descriptor, "wb")
    except BaseException:
        os.close(descriptor)
        raise


class _Receiver:
    """python-multipart callbacks that collect text fields and queue file chunks for writing."""

    def __init__(self, staging: Path, max_bytes: int) -> None:
        self.staging = staging
        self.max_bytes = max_bytes
        self.upload = Upload()
        self.received = 0
        self.pending: list[tuple[BinaryIO, bytes]] = []
        self._handles: list[BinaryIO] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._text = bytearray()
        self._file: BinaryIO | None = None
        self.complete = False  # the closing boundary was seen

    def on_end(self) -> None:
        self.complete = True

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._text, self._file = b"", "", bytearray(), None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.upload.fields or name in self.upload.files:
            raise MalformedRequestError(f"part {name[:40]!r} appears twice")
        self._name = name
        if name in FILE_PARTS:
            if b"filename" not in options:
                raise MalformedRequestError(f"part '{name}' must be a file upload")
            suffix = _suffix(name, options[b"filename"].decode("utf-8", "replace"))
            stored = StoredFile(self.staging / f"{FILE_PARTS[name]}{suffix}", suffix)
            try:
                self._file = _create(stored.path)
            except OSError as error:
                raise storage_error("store the upload", error) from None
            self._handles.append(self._file)
            self.upload.files[name] = stored
        elif name not in TEXT_PARTS:
            expected = ", ".join([*FILE_PARTS, *TEXT_PARTS])
            raise MalformedRequestError(f"unexpected part {name[:40]!r}; expected {expected}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise PayloadTooLargeError(f"upload exceeds the limit of {self.max_bytes:,} bytes")
        if self._file is not None:
            self.upload.files[self._name].size += len(chunk)
            self.pending.append((self._file, chunk))
        elif len(self._text) + len(chunk) > MAX_TEXT_BYTES:
            raise MalformedRequestError(
                f"field '{self._name}' is longer than {MAX_TEXT_BYTES} bytes"
            )
        else:
            self._text.extend(chunk)

    def on_part_end(self) -> None:
        if self._file is None:
            self.upload.fields[self._name] = self._text.decode("utf-8", "replace").strip()

    def write_pending(self) -> None:
        try:
            for handle, chunk in self.pending:
                handle.write(chunk)
        except OSError as error:
            raise storage_error("store the upload", error) from None
        self.pending.clear()

    def sync(self) -> None:
        """Write what is pending, then fsync every stored file and the staging directory."""
        self.write_pending()
        try:
            for handle in self._handles:
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(self.staging)
        except OSError as error:
            raise storage_error("store the upload", error) from None

    def close(self) -> None:
        """Close every stored file; after a failure they are discarded with the staging folder."""
        for handle in self._handles:
            with contextlib.suppress(OSError):  # nothing is left to flush after sync()
                handle.close()


async def receive(
    stream: AsyncIterator[bytes], boundary: bytes, staging: Path, max_bytes: int
) -> Upload:
    """Parse a multipart body from ``stream`` into ``staging`` (see the module docstring)."""
    receiver = _Receiver(staging, max_bytes)
    callbacks = {
        "on_part_begin": receiver.on_part_begin,
        "on_part_data": receiver.on_part_data,
        "on_part_end": receiver.on_part_end,
        "on_header_field": receiver.on_header_field,
        "on_header_value": receiver.on_header_value,
        "on_header_end": receiver.on_header_end,
        "on_headers_finished": receiver.on_headers_finished,
        "on_end": receiver.on_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    body = 0  # the whole body counts, not only the parts: the parser discards an epilogue
    try:
        async for chunk in stream:
            body += len(chunk)
            if body > max_bytes:
                raise PayloadTooLargeError(f"upload exceeds the limit of {max_bytes:,} bytes")
            parser.write(chunk)
            if receiver.pending:
                await anyio.to_thread.run_sync(receiver.write_pending)
        parser.finalize()
        if not receiver.complete:  # cut off: the last part may be short, fields may be missing
            raise MalformedRequestError("incomplete multipart body: no closing boundary")
        await anyio.to_thread.run_sync(receiver.sync)
    except FormParserError as error:
        raise MalformedRequestError(f"malformed multipart body ({error})") from None
    finally:
        receiver.close()
    if "file" not in receiver.upload.files:
        raise MalformedRequestError("no 'file' part: upload the scan as a file named 'file'")
    return receiver.upload
