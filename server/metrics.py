"""Prometheus metrics of the API, on a registry per app (no global state).

- ``sitefit_http_requests_total{route, method, status}`` and
  ``sitefit_http_request_duration_seconds{route, method}``, where ``route`` is the route's
  template (``/v1/jobs/{job_id}``), never the raw path, so ids do not explode cardinality.
- ``sitefit_jobs_submitted_total{mode}``: jobs accepted by ``POST /v1/jobs``.
- ``sitefit_jobs{status, mode}``: jobs held in the job store, by status, read at scrape time.
- ``sitefit_queue_depth``: jobs waiting to start (absent while the queue is unreachable).
- ``sitefit_deliveries_total{destination, outcome}``: tries to send results to PACS
  destinations (outcome ``delivered``, ``retry``, ``failed``, ``dropped``), and
  ``sitefit_deliveries_failed``: the dead-letter list's size, read at scrape time
  (:class:`DeliveryMetrics`).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sitefit.deliveries import DeliveryStore
from sitefit.job_store import JobStorageError, JobStore
from sitefit.jobs import JobNotFoundError

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STATUSES = ("queued", "running", "finished", "failed", "canceled")


class ApiMetrics:
    def __init__(
        self, registry: CollectorRegistry, store: JobStore, depth: Callable[[], int | None]
    ) -> None:
        self.registry = registry
        self.requests = Counter(
            "sitefit_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sitefit_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.submitted = Counter(
            "sitefit_jobs_submitted_total",
            "Jobs accepted and queued, by requested mode.",
            ["mode"],
            registry=registry,
        )
        registry.register(_StoreCollector(store, depth))


class _StoreCollector(Collector):
    def __init__(self, store: JobStore, depth: Callable[[], int | None]) -> None:
        self.store = store
        self.depth = depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: Tally[tuple[str, str]] = Tally()
        try:
            for job_id in self.store.job_ids():
                try:
                    state = self.store.state(job_id)
                except (JobNotFoundError, JobStorageError):
                    continue
                counts[(state.status, state.record.mode)] += 1
        except JobStorageError:
            pass
        jobs = GaugeMetricFamily(
            "sitefit_jobs", "Jobs in the job store by status and mode.", labels=["status", "mode"]
        )
        for (status, mode), count in sorted(counts.items()):
            jobs.add_metric([status, mode], count)
        yield jobs
        depth = self.depth()
        if depth is not None:
            yield GaugeMetricFamily("sitefit_queue_depth", "Jobs waiting to start.", value=depth)


class DeliveryMetrics:
    """Metrics of sending results to PACS destinations (labels: configured names only)."""

    def __init__(self, registry: CollectorRegistry, deliveries: DeliveryStore) -> None:
        self.outcomes = Counter(
            "sitefit_deliveries",
            "Deliveries of results to PACS destinations, by destination and outcome "
            "(delivered, retry, failed, dropped).",
            ["destination", "outcome"],
            registry=registry,
        )
        registry.register(_DeliveryCollector(deliveries))


class _DeliveryCollector(Collector):
    def __init__(self, deliveries: DeliveryStore) -> None:
        self.deliveries = deliveries

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            failed = self.deliveries.count("failed")
        except JobStorageError:
            return  # storage unreachable: no value rather than a wrong one
        yield GaugeMetricFamily(
            "sitefit_deliveries_failed",
            "Deliveries that used all their tries (the dead-letter list).",
            value=failed,
        )


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by its route template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = _route_template(scope)
            method = _method_label(scope)
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


# Any token is a valid HTTP method to the server: labels take the standard ones only, so that
# requests with made-up methods (no key needed) cannot grow /metrics without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method_label(scope: Scope) -> str:
    method = str(scope.get("method", ""))
    return method if method in _METHODS else "other"
