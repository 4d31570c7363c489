"""What the routes share, built once per app: settings, stores, queue, keys, metrics, and the
PACS side (the inbox of received instances, the dispatcher that turns complete series into
jobs, the deliveries of results).

Routes reach it through the ``ServicesDep`` dependency (``Annotated``), never through module
globals, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from model_store.base_models import BaseModelRegistry
from model_store.sites import SiteStore
from server.auth import KeyRing
from server.dispatch import Dispatcher
from server.metrics import ApiMetrics, DeliveryMetrics
from server.queues import EmbeddedQueue, JobQueue
from sitefit.deliveries import DeliveryStore
from sitefit.inbox import Inbox
from sitefit.job_store import JobStore
from sitefit.settings import Settings


@dataclass
class Services:
    settings: Settings
    store: JobStore
    queue: JobQueue
    models: BaseModelRegistry
    sites: SiteStore
    keys: KeyRing
    registry: CollectorRegistry
    metrics: ApiMetrics
    inbox: Inbox
    deliveries: DeliveryStore
    delivery_metrics: DeliveryMetrics
    dispatcher: Dispatcher

    @classmethod
    def build(cls, settings: Settings, queue: JobQueue | None = None) -> Services:
        store = JobStore.from_settings(settings)
        registry = CollectorRegistry()
        if queue is None:
            if settings.redis_url is not None:
                from server.queue_redis import RedisQueue

                queue = RedisQueue(settings, store)
            else:
                queue = EmbeddedQueue(settings, store, registry)
        models = BaseModelRegistry(settings.models_dir)
        inbox = Inbox.from_settings(settings)
        deliveries = DeliveryStore.from_settings(settings)
        return cls(
            settings=settings,
            store=store,
            queue=queue,
            models=models,
            sites=SiteStore(settings.sites_dir),
            keys=KeyRing(settings),
            registry=registry,
            metrics=ApiMetrics(registry, store, queue.depth),
            inbox=inbox,
            deliveries=deliveries,
            delivery_metrics=DeliveryMetrics(registry, deliveries),
            dispatcher=Dispatcher(settings, inbox, store, queue, models, deliveries),
        )


async def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]
