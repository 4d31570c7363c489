"""``GET /v1/models``: the registered base models (shared by every site)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from server.auth import CallerDep
from server.errors import responses
from server.schemas import ModelEntry, ModelList, ModelVersion
from server.services import Services, ServicesDep

router = APIRouter(prefix="/v1/models", tags=["models"])


def _list(services: Services) -> ModelList:
    entries = []
    for name in services.models.names():
        versions = services.models.versions(name)
        latest = services.models.spec(f"{name}@{versions[-1]}")
        entries.append(ModelEntry(name=name, versions=versions, latest=ModelVersion.of(latest)))
    return ModelList(models=entries)


@router.get("", response_model=ModelList, responses=responses(), summary="Base models")
async def list_models(services: ServicesDep, _caller: CallerDep) -> ModelList:
    return await run_in_threadpool(_list, services)
