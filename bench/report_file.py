"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone."""

from __future__ import annotations

import fcntl
from pathlib import Path

from sitefit.durable import write_atomic


def replace_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- KEY:begin -->`` and ``<!-- KEY:end -->``.

    Benchmarks running side by side may finish together: the read-modify-write is done under
    an exclusive lock on a lock file beside ``path``, and the new text is renamed into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace(path, key, title, body)


def _replace(path: Path, key: str, title: str, body: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n### {title}\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_atomic(path, text.encode("utf-8"))
