"""``/v1/sites``: adapted weights per site; a key sees and deletes only its own sites."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path

from model_store.sites import UnreadableVersion, check_site
from server.auth import CallerDep
from server.errors import responses
from server.schemas import SiteDeleted, SiteDetail, SiteEntry, SiteList
from server.services import ServicesDep
from sitefit.exceptions import SiteNotFoundError

log = logging.getLogger("sitefit.server")
router = APIRouter(prefix="/v1/sites", tags=["sites"])
SiteName = Annotated[str, Path(description="site name", max_length=64)]


@router.get("", response_model=SiteList, responses=responses(), summary="Sites you may use")
def list_sites(services: ServicesDep, caller: CallerDep) -> SiteList:
    store = services.sites
    entries = [
        SiteEntry(site=site, models=store.models_of(site))
        for site in store.sites()
        if caller.may_use(site)
    ]
    return SiteList(sites=entries)


@router.get(
    "/{site}",
    response_model=SiteDetail,
    responses=responses(404, 422),
    summary="Every saved version of a site's adapted weights",
)
def get_site(site: SiteName, services: ServicesDep, caller: CallerDep) -> SiteDetail:
    check_site(site)
    caller.require(site)
    store = services.sites
    models = store.models_of(site)
    if not models:
        raise SiteNotFoundError(f"unknown site {site!r} (no adapted weights)")
    detail = SiteDetail(site=site, models={})
    for model in models:
        unreadable: list[UnreadableVersion] = []
        detail.models[model] = store.history(site, model, unreadable=unreadable)
        if unreadable:
            detail.unreadable[model] = unreadable
            log.warning("site %s model %s: %d unreadable version(s)", site, model, len(unreadable))
    return detail


@router.delete(
    "/{site}",
    response_model=SiteDeleted,
    responses=responses(404, 422),
    summary="Delete a site's adapted weights (every model, every version)",
)
def delete_site(site: SiteName, services: ServicesDep, caller: CallerDep) -> SiteDeleted:
    check_site(site)
    caller.require(site)
    services.sites.delete(site)
    log.info("site %s: adapted weights deleted by %s", site, caller.name)
    return SiteDeleted(site=site, deleted=True)
