"""``GET /v1/models``: the registered base models (shared by every site)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from model_store.base_models import UnreadableModel
from server.auth import CallerDep
from server.errors import responses
from server.schemas import ModelEntry, ModelList, ModelVersion
from server.services import Services, ServicesDep

log = logging.getLogger("sitefit.server")
router = APIRouter(prefix="/v1/models", tags=["models"])


def _list(services: Services) -> ModelList:
    unreadable: list[UnreadableModel] = []
    entries = [
        ModelEntry(name=latest.name, versions=versions, latest=ModelVersion.of(latest))
        for latest, versions in services.models.catalog(unreadable=unreadable)
    ]
    for bad in unreadable:
        log.warning("model %s@%d: unreadable spec", bad.name, bad.version)
    return ModelList(models=entries, unreadable=unreadable)


@router.get("", response_model=ModelList, responses=responses(), summary="Base models")
async def list_models(services: ServicesDep, _caller: CallerDep) -> ModelList:
    return await run_in_threadpool(_list, services)
