"""Operations: ``/healthz`` (the process answers), ``/readyz`` (it can take jobs), ``/metrics``.

These three need no API key: probes and Prometheus scrape them, and they reveal no job,
site or scan data (metrics are labelled by route, status and mode only).
"""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.schemas import Health, Readiness
from server.services import Services, ServicesDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


def _checks(services: Services) -> dict[str, str]:
    checks = {"queue": services.queue.problem() or "ok"}
    jobs = services.store.root
    try:
        jobs.mkdir(parents=True, exist_ok=True)
        writable = os.access(jobs, os.W_OK | os.X_OK)
        checks["job_storage"] = "ok" if writable else f"{jobs} is not writable"
    except OSError as error:
        checks["job_storage"] = f"job storage unusable ({error.strerror})"
    return checks


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: see checks"}},
    summary="Readiness: job queue reachable, job storage writable",
)
async def readyz(services: ServicesDep) -> JSONResponse:
    checks = await run_in_threadpool(_checks, services)
    ready = all(value == "ok" for value in checks.values())
    body = Readiness(ready=ready, queue=services.queue.kind, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
async def metrics(services: ServicesDep) -> Response:
    body = await run_in_threadpool(generate_latest, services.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
