"""A scanner's site key from a DICOM series' own headers, so each scanner gets its own weights.

When a PACS route fixes no site, the series' scanner headers name it: by default
Manufacturer, ManufacturerModelName, MagneticFieldStrength, StationName, DeviceSerialNumber
and InstitutionName (``Settings.site_key_headers``). The key is a readable slug of the first
two (who made the scanner, which model) and a short hash of all of them, e.g.
``siemens-prisma-3f9a1c2e``: stable (the same scanner always gives the same key), distinct (two
scanners of one model differ in station or serial number, hence in the hash), and a valid site
name (at most 64 characters of ``[a-z0-9-]``). Station, serial number and institution enter
only through the hash, so the key names no place or device; absent headers hash as empty.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

HASH_DIGITS = 8
SLUG_HEADERS = 2  # the first headers of the list make the readable part
MAX_SLUG = 40
_NON_SLUG = re.compile(r"[^a-z0-9]+")


def _text(dataset: Any, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except Exception:  # a malformed value reads as absent; it must not fail the job
        return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, float):
        return format(value, "g")
    return " ".join(str(value).split())


def site_key(dataset: Any, keywords: Sequence[str]) -> str:
    """The site key of the scanner that made ``dataset`` (a pydicom Dataset)."""
    values = [_text(dataset, keyword) for keyword in keywords]
    digest = hashlib.sha256(
        "\x1f".join(f"{k}={v}" for k, v in zip(keywords, values, strict=True)).encode()
    ).hexdigest()[:HASH_DIGITS]
    words = " ".join(values[:SLUG_HEADERS]).lower()
    slug = _NON_SLUG.sub("-", words).strip("-")[:MAX_SLUG].strip("-")
    return f"{slug}-{digest}" if slug else f"scanner-{digest}"


__all__ = ["site_key"]
