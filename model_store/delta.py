"""The stored form of a site delta: safetensors (no pickle), gzip'd with mtime 0, so the
same tensors always give the same bytes (and the same sha256)."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from sitefit.exceptions import InvalidInputError

MAX_DELTA_BYTES = 256 * 1024 * 1024  # decompressed; a delta is tens of KB
Tensors = dict[str, np.ndarray]


def encode_delta(tensors: Tensors) -> bytes:
    """Tensors -> the stored delta bytes (deterministic for the same tensors)."""
    if not tensors:
        raise InvalidInputError("a site delta needs at least one tensor")
    arrays: Tensors = {}
    for key, value in tensors.items():
        array = np.asarray(value)
        arrays[key] = array if array.flags["C_CONTIGUOUS"] else array.copy(order="C")
    try:
        payload = save_tensors(arrays)
    except Exception as error:  # safetensors raises its own error types
        raise InvalidInputError(f"tensors cannot be stored as safetensors ({error})") from None
    return gzip.compress(payload, compresslevel=6, mtime=0)


def decode_delta(data: bytes) -> Tensors:
    """Stored delta bytes -> tensors; a malformed file raises ``ValueError``."""
    inflater = zlib.decompressobj(wbits=31)  # gzip container
    try:
        payload = inflater.decompress(data, MAX_DELTA_BYTES)
    except zlib.error as error:
        raise ValueError(f"not a gzip stream ({error})") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("truncated or oversized delta")
    try:
        return load_tensors(payload)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"not a safetensors file ({type(error).__name__})") from None
