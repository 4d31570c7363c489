"""In-memory cache of materialised per-site models, under a byte budget with LRU eviction.

A worker keeps the nets it built from a base model plus a site delta warm (on the net's
device, so on the GPU when there is one) and drops the least recently used ones when the sum
of their sizes would exceed the budget. Keys name exactly what a net was built from, so a new
site version or another base model is simply another key. The counters (``hits``, ``misses``,
``evictions``, ``bytes_used``, ``entries``) are plain attributes a metrics exporter can read.

Cached values are shared, not copied: a caller that changes weights (refinement) must work on
a copy (``copy.deepcopy``) and never on the cached module itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch

V = TypeVar("V", bound=torch.nn.Module)


class CacheKey(NamedTuple):
    """What a site net was built from. A site deleted and saved again starts its versions at
    1 once more, so the delta's own sha256 is part of the key: a worker never serves a
    deleted site's weights under a new version's number."""

    site: str
    model: str
    site_version: int
    base_sha256: str
    delta_sha256: str


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes_used: int
    budget_bytes: int


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


class ModelCache(Generic[V]):
    """LRU cache of modules keyed by :class:`CacheKey`, bounded by ``budget_bytes``.

    Thread-safe; no process-global state: each worker owns its instance.
    """

    def __init__(self, budget_bytes: int, sizeof: Callable[[V], int] = module_nbytes) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._sizeof = sizeof
        self._entries: OrderedDict[CacheKey, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes_used = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership without touching the counters or the recency order."""
        return key in self._entries

    def keys(self) -> list[CacheKey]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self.hits,
                self.misses,
                self.evictions,
                len(self._entries),
                self.bytes_used,
                self.budget_bytes,
            )

    def get(self, key: CacheKey) -> V | None:
        """The cached module (now the most recently used), or ``None``; counts a hit or miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: CacheKey, value: V) -> bool:
        """Insert or replace; evicts least recently used entries to stay within the budget.

        Returns ``False`` (and caches nothing) when ``value`` alone exceeds the budget.
        """
        size = self._sizeof(value)
        with self._lock:
            self._drop(key)
            if size > self.budget_bytes:
                return False
            while self._entries and self.bytes_used + size > self.budget_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.evictions += 1
            self._entries[key] = (value, size)
            self.bytes_used += size
            return True

    def get_or_create(self, key: CacheKey, build: Callable[[], V]) -> V:
        """The cached module, or ``build()`` cached and returned (built outside the lock)."""
        value = self.get(key)
        if value is None:
            value = build()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry[1]
