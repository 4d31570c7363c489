"""Prometheus metrics of one worker process (served on ``sitefit worker --metrics-port``).

Everything is registered on the :class:`~prometheus_client.CollectorRegistry` passed in, never
on the global default registry, so several workers (or the API's embedded worker and tests)
can each keep their own. Job metrics come from :class:`worker.job.JobEnded` events; the model
cache's counters and the GPU's memory are read when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.job import JobEnded

_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_UNIT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
_EPOCHS = (0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 100, 200)
_STAGES = ("load", "segment", "adapt", "metrics")


@runtime_checkable
class _CacheStats(Protocol):
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes_used: int


class WorkerMetrics:
    """The worker's job metrics; call :meth:`observe` with each ended job."""

    def __init__(self, registry: CollectorRegistry, engine: object | None = None) -> None:
        self.jobs = Counter(
            "sitefit_worker_jobs_total",
            "Jobs this worker ran, by outcome and requested mode.",
            ["outcome", "mode"],
            registry=registry,
        )
        self.retries = Counter(
            "sitefit_worker_job_retries_total",
            "Jobs this worker ran again after an earlier attempt's worker died.",
            registry=registry,
        )
        self.duration = Histogram(
            "sitefit_job_duration_seconds",
            "Wall time of a job in the worker, by outcome.",
            ["outcome"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.stage = Histogram(
            "sitefit_job_stage_duration_seconds",
            "Engine time per stage of finished jobs (load, segment, adapt, metrics).",
            ["stage"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.epochs = Histogram(
            "sitefit_refinement_epochs",
            "Refinement epochs run per finished job (0 when refinement was skipped).",
            ["model"],
            buckets=_EPOCHS,
            registry=registry,
        )
        self.consistency = Histogram(
            "sitefit_self_consistency_dice",
            "Dice between the early-head and final masks, before and after refinement.",
            ["model", "phase"],  # no site: /metrics is open, and sites are many
            buckets=_UNIT,
            registry=registry,
        )
        registry.register(_LiveCollector(engine))

    def observe(self, event: JobEnded) -> None:
        record = event.record
        self.jobs.labels(event.outcome, record.mode).inc()
        if event.attempt > 1:
            self.retries.inc()
        self.duration.labels(event.outcome).observe(event.seconds)
        report = event.report
        if report is None or event.outcome != "finished":
            return
        timings = report.timings_s
        for stage in _STAGES:
            self.stage.labels(stage).observe(float(getattr(timings, stage)))
        self.epochs.labels(report.model.name).observe(report.refinement.epochs)
        for phase, overlap in (
            ("before", report.self_consistency.before),
            ("after", report.self_consistency.after),
        ):
            if overlap.dice is not None:
                self.consistency.labels(report.model.name, phase).observe(overlap.dice)


class _LiveCollector(Collector):
    """Values read at scrape time: the engine's model cache and the GPU's memory."""

    def __init__(self, engine: object | None) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        stats = self._cache_stats()
        if stats is not None:
            for name, value, text in (
                ("hits", stats.hits, "Model cache lookups that found a warm net."),
                ("misses", stats.misses, "Model cache lookups that had to build a net."),
                ("evictions", stats.evictions, "Nets dropped from the model cache."),
            ):
                yield CounterMetricFamily(f"sitefit_model_cache_{name}_total", text, value=value)
            yield GaugeMetricFamily(
                "sitefit_model_cache_bytes", "Bytes of nets in the model cache.", stats.bytes_used
            )
            yield GaugeMetricFamily(
                "sitefit_model_cache_entries", "Nets in the model cache.", stats.entries
            )
        sites = getattr(getattr(self.engine, "store", None), "sites", None)
        errors = getattr(sites, "integrity_errors", None)
        if isinstance(errors, int):
            yield CounterMetricFamily(
                "sitefit_site_store_integrity_errors_total",
                "Site weights found missing, torn or corrupt (the job used the base model).",
                value=errors,
            )
        yield from _gpu_memory()

    def _cache_stats(self) -> _CacheStats | None:
        cache = getattr(self.engine, "site_models", None)  # the engine's warm site-model cache
        stats = cache.stats() if cache is not None and hasattr(cache, "stats") else None
        return stats if isinstance(stats, _CacheStats) else None


def _gpu_memory() -> Iterator[GaugeMetricFamily]:
    import torch

    if not torch.cuda.is_available():
        return
    family = GaugeMetricFamily(
        "sitefit_gpu_memory_bytes",
        "GPU memory held by this worker's torch allocator (allocated, reserved).",
        labels=["device", "kind"],
    )
    for index in range(torch.cuda.device_count()):
        family.add_metric([str(index), "allocated"], torch.cuda.memory_allocated(index))
        family.add_metric([str(index), "reserved"], torch.cuda.memory_reserved(index))
    yield family


__all__ = ["WorkerMetrics"]
