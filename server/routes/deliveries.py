"""``/v1/deliveries``: results sent to PACS destinations; list them, resend failed ones.

A key sees the deliveries of jobs whose site it may use; a delivery whose job is gone is
seen by keys for every site (``"*"``) only. Someone else's delivery answers 404, as an
unknown one does: ids are not confirmed to callers that may not use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.auth import Caller, CallerDep
from server.errors import ErrorResponse, responses
from server.schemas import DeliveryList, DeliveryView
from server.services import Services, ServicesDep
from sitefit.deliveries import (
    Delivery,
    DeliveryNotFoundError,
    DeliveryStatus,
    DeliveryStore,
    check_delivery_id,
)
from sitefit.job_store import JobStorageError
from sitefit.jobs import JobNotFoundError

log = logging.getLogger("sitefit.server")
router = APIRouter(prefix="/v1/deliveries", tags=["deliveries"])
DeliveryId = Annotated[str, Path(description="delivery id (24 hex digits)")]


def _store(services: Services) -> DeliveryStore:
    return services.deliveries


def _visibility(services: Services, caller: Caller) -> Callable[[Delivery], bool]:
    """Whether ``caller`` may see a delivery: by its job's site, each job read once."""
    if caller.sites is None:
        return lambda _delivery: True
    sites: dict[str, str | None] = {}  # job id -> its site (None: none, or the job is gone)

    def visible(delivery: Delivery) -> bool:
        if delivery.job_id not in sites:
            try:
                sites[delivery.job_id] = services.store.record(delivery.job_id).site
            except (JobNotFoundError, JobStorageError):
                sites[delivery.job_id] = None
        return caller.may_use(sites[delivery.job_id])

    return visible


@router.get(
    "",
    response_model=DeliveryList,
    responses=responses(422),
    summary="Deliveries of results to PACS destinations, newest first",
)
def list_deliveries(
    services: ServicesDep,
    caller: CallerDep,
    status: Annotated[
        DeliveryStatus | None, Query(description="only these; failed: the dead-letter list")
    ] = None,
) -> DeliveryList:
    visible = _visibility(services, caller)
    found = [d for d in _store(services).records(status) if visible(d)]
    return DeliveryList(deliveries=[DeliveryView.of(d) for d in found])


@router.post(
    "/{delivery_id}/resend",
    response_model=DeliveryView,
    responses={
        **responses(404),
        409: {"model": ErrorResponse, "description": "only a failed delivery can be resent"},
    },
    summary="Send a failed delivery again (its tries start over)",
)
def resend_delivery(
    delivery_id: DeliveryId, services: ServicesDep, caller: CallerDep
) -> DeliveryView:
    check_delivery_id(delivery_id)
    store = _store(services)
    if not _visibility(services, caller)(store.get(delivery_id)):
        raise DeliveryNotFoundError(f"unknown delivery {delivery_id!r}")
    delivery = store.resend(delivery_id)
    log.info(
        "delivery %s of job %s to %s: resent by %s",
        delivery.id,
        delivery.job_id,
        delivery.destination,
        caller.name,
    )
    return DeliveryView.of(delivery)
