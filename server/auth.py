"""API keys scoped to sites: ``Authorization: Bearer KEY`` -> the :class:`Caller`.

``SITEFIT_API_KEYS`` maps each key to the sites it may use (``["*"]``: all). A request without
a key, or with an unknown one, is refused with 401; a known key touching a job or the weights
of a site outside its list is refused with 403. Jobs without a site can only be used by keys
with ``"*"``. With no keys configured there is no authentication at all, which
``Settings`` only allows on a loopback address. Keys are compared in constant time and never
logged; a caller is identified in logs by a short hash of its key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.errors import ForbiddenError, UnauthorizedError
from sitefit.settings import Settings

ALL_SITES = "*"


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``sites is None`` means every site (a ``*`` key, or no auth at all)."""

    name: str
    sites: frozenset[str] | None

    def may_use(self, site: str | None) -> bool:
        return self.sites is None or (site is not None and site in self.sites)

    def require(self, site: str | None) -> None:
        """403 unless this caller may use ``site`` (``None``: a job without a site)."""
        if self.may_use(site):
            return
        if site is None:
            raise ForbiddenError("this API key is limited to named sites; the object has none")
        raise ForbiddenError(f"this API key may not use site {site!r}")


class KeyRing:
    """The configured keys; :meth:`identify` turns an Authorization header into a Caller."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [
            (key.encode(), None if ALL_SITES in sites else frozenset(sites))
            for key, sites in settings.api_keys.items()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> Caller:
        if not self._keys:
            return Caller("anonymous (no API keys configured)", None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer KEY'")
        presented = token.strip().encode()
        found, scope = False, None
        for key, sites in self._keys:  # compare with every key: constant time per key
            if hmac.compare_digest(key, presented):
                found, scope = True, sites
        if not found:
            raise UnauthorizedError("unknown API key")
        return Caller("key-" + hashlib.sha256(presented).hexdigest()[:8], scope)


async def caller(request: Request) -> Caller:
    """The caller of a request (async: no thread hop for a few microseconds of work)."""
    ring: KeyRing = request.app.state.services.keys
    return ring.identify(request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(caller)]
