"""The app factory: ``create_app(settings)`` -> a FastAPI app serving the ``/v1`` contract.

Everything the routes need is built here from the settings passed in (no module globals), so
tests create as many apps as they like. The lifespan starts the job queue (Redis, or the
embedded worker thread when ``settings.redis_url`` is unset) and a maintenance loop that,
every ``maintenance_interval_s``, deletes expired job data, reconciles the store with the
queue (jobs of dead workers) and removes what killed writers left in the model store. Two
PACS loops run beside it: the dispatcher turns complete series that a PACS sent into jobs
(:mod:`server.dispatch`), and the delivery loop sends finished jobs' DICOM SEGs to their
routes' destinations (:mod:`server.delivery`); each runs its blocking work in a thread, so
a slow PACS never holds up the API. This package never imports torch; the embedded worker
thread imports the engine when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

import sitefit
from server.delivery import deliver_due
from server.errors import install_error_handlers
from server.metrics import MetricsMiddleware
from server.offline_docs import install_offline_docs
from server.queues import JobQueue
from server.routes import deliveries, dicomweb, jobs, models, ops, sites, ui
from server.services import Services
from sitefit import defaults
from sitefit.settings import Settings

log = logging.getLogger("sitefit.server")

PACS_INTERVAL_S = 1.0  # how often complete series and due deliveries are looked for


def create_app(settings: Settings, *, queue: JobQueue | None = None) -> FastAPI:
    """Build the API for ``settings`` (``queue``: override the queue chosen from settings)."""
    services = Services.build(settings, queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(services.queue.start)
        tasks = [
            asyncio.create_task(_maintain_forever(services)),
            asyncio.create_task(_every(PACS_INTERVAL_S, "PACS dispatch", dispatch_once, services)),
            asyncio.create_task(_every(PACS_INTERVAL_S, "PACS delivery", deliver_once, services)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await run_in_threadpool(services.queue.stop)

    app = FastAPI(
        title="sitefit",
        version=sitefit.__version__,
        summary="Segmentation that adapts its early U-Net layers to each scanner site.",
        lifespan=lifespan,
        docs_url=None,  # served by install_offline_docs, without a CDN
        redoc_url=None,
    )
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    for module in (jobs, models, sites, deliveries, dicomweb, ops, ui):
        app.include_router(module.router)
    install_offline_docs(app)
    return app


def maintain_once(services: Services) -> None:
    """One maintenance pass: expired job data, dead or lost jobs, then what interrupted
    writes left in the model store (each on its own)."""
    try:
        deleted = services.store.sweep()
        if deleted:
            log.info("retention: deleted %d expired job(s)", deleted)
    except Exception as error:  # e.g. storage unreachable: try again next time
        log.warning("retention pass failed: %s: %s", type(error).__name__, error)
    try:
        services.queue.maintain()
    except Exception as error:  # e.g. Redis down: try again next time
        log.warning("queue maintenance failed: %s: %s", type(error).__name__, error)
    try:  # what killed writers left in the model store
        swept = sum(
            backend.sweep(defaults.STORE_DEBRIS_AGE_S)
            for backend in (services.models.backend, services.sites.backend)
        )
        if swept:
            log.info("model store: removed %d leftover(s) of interrupted writes", swept)
    except Exception as error:  # e.g. storage unreachable: try again next time
        log.warning("model store sweep failed: %s: %s", type(error).__name__, error)
    try:
        services.deliveries.sweep()
    except Exception as error:  # e.g. storage unreachable: try again next time
        log.warning("delivery sweep failed: %s: %s", type(error).__name__, error)


def dispatch_once(services: Services) -> None:
    """Complete PACS series become jobs (one pass)."""
    services.dispatcher.dispatch_once()


def deliver_once(services: Services) -> None:
    """Due deliveries of results to the PACS (one pass)."""
    deliver_due(services.deliveries, services.store, services.settings, services.delivery_metrics)


async def _maintain_forever(services: Services) -> None:
    while True:
        await run_in_threadpool(maintain_once, services)
        await asyncio.sleep(services.settings.maintenance_interval_s)


async def _every(
    interval_s: float, what: str, work: Callable[[Services], None], services: Services
) -> None:
    """Run ``work`` in a thread every ``interval_s``; a failed pass is logged and retried."""
    while True:
        try:
            await run_in_threadpool(work, services)
        except Exception as error:  # e.g. storage unreachable: try again next time
            log.warning("%s pass failed: %s: %s", what, type(error).__name__, error)
        await asyncio.sleep(interval_s)
