"""ModelCache: byte budget, LRU eviction, hit/miss counters, sizes from parameters+buffers."""

from __future__ import annotations

import pytest
import torch

from worker.cache import CacheKey, ModelCache, module_nbytes
from worker.nets import NetConfig, SegmentationNet
from worker.weights import to_numpy


def key(site: str, version: int = 1, model: str = "brain") -> CacheKey:
    return CacheKey(site, model, version, "ab" * 32, "cd" * 32)


def linear() -> torch.nn.Linear:
    return torch.nn.Linear(10, 10)  # 110 float32 parameters = 440 bytes


def test_sizes_count_parameters_and_buffers() -> None:
    assert module_nbytes(linear()) == 440
    bn = torch.nn.BatchNorm2d(4)  # weight, bias, mean, var: 4 x 16 B; num_batches_tracked 8 B
    assert module_nbytes(bn) == 4 * 16 + 8
    net = SegmentationNet(NetConfig(num_outputs=1, base_channels=4))
    assert module_nbytes(net) == sum(a.nbytes for a in to_numpy(net).values())


def test_lru_eviction_respects_the_byte_budget() -> None:
    cache: ModelCache[torch.nn.Module] = ModelCache(budget_bytes=2 * 440 + 100)
    a, b, c = linear(), linear(), linear()
    assert cache.put(key("a"), a) and cache.put(key("b"), b)
    assert cache.get(key("a")) is a  # a is now the most recently used
    assert cache.put(key("c"), c)
    assert key("b") not in cache and key("a") in cache and key("c") in cache
    assert cache.keys() == [key("a"), key("c")]
    assert cache.bytes_used == 880 <= cache.budget_bytes
    assert cache.evictions == 1
    big = torch.nn.Linear(10, 20)  # 220 parameters = 880 bytes: only fits alone
    assert cache.put(key("big"), big)
    assert cache.keys() == [key("big")]
    assert cache.bytes_used == 880 <= cache.budget_bytes
    assert cache.evictions == 3


def test_a_value_larger_than_the_budget_is_not_cached() -> None:
    cache: ModelCache[torch.nn.Module] = ModelCache(budget_bytes=400)
    cache.put(key("small"), torch.nn.Linear(2, 2))
    assert not cache.put(key("huge"), linear())
    assert key("huge") not in cache and key("small") in cache
    assert cache.bytes_used <= cache.budget_bytes


def test_hits_and_misses_are_counted() -> None:
    cache: ModelCache[torch.nn.Module] = ModelCache(budget_bytes=10_000)
    assert cache.get(key("a")) is None
    cache.put(key("a"), linear())
    cache.get(key("a"))
    cache.get(key("a"))
    assert key("a") in cache  # membership tests count nothing
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes_used) == (2, 1, 1, 440)


def test_get_or_create_builds_once_per_key() -> None:
    cache: ModelCache[torch.nn.Module] = ModelCache(budget_bytes=10_000)
    builds: list[int] = []

    def build() -> torch.nn.Module:
        builds.append(1)
        return linear()

    first = cache.get_or_create(key("a"), build)
    assert cache.get_or_create(key("a"), build) is first
    cache.get_or_create(key("a", version=2), build)  # a new site version is another key
    assert len(builds) == 2 and (cache.hits, cache.misses) == (1, 2)


def test_replace_and_clear_keep_the_accounting_right() -> None:
    cache: ModelCache[torch.nn.Module] = ModelCache(budget_bytes=10_000)
    cache.put(key("a"), linear())
    cache.put(key("a"), linear())
    assert (len(cache), cache.bytes_used) == (1, 440)
    cache.put(key("a", model="heart"), linear())
    cache.put(key("b"), linear())
    assert cache.keys() == [key("a"), key("a", model="heart"), key("b")]
    assert cache.bytes_used == 3 * 440
    cache.clear()
    assert (len(cache), cache.bytes_used) == (0, 0)


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        ModelCache(budget_bytes=-1)
