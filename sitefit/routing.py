"""PACS routing: which model serves a series, and where its result goes (no torch, no I/O).

A **route** is what a PACS addresses: the AE title it dials over DIMSE, or the route name in a
DICOMweb URL (``/dicomweb/routes/{route}/studies``, or ``?route=`` on ``/dicomweb/studies``).
It fixes the model and mode of the jobs its series become, optionally their site (else the
site is derived from the series' scanner headers, :mod:`sitefit.site_keys`), and the
**destinations** the DICOM SEG of each finished job is sent to: a DIMSE peer (C-STORE) or a
DICOMweb server (STOW-RS). Both are configured as JSON in ``SITEFIT_DICOM_ROUTES`` and
``SITEFIT_DICOM_DESTINATIONS`` and checked by :class:`~sitefit.settings.Settings`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from sitefit.report import Mode

# DICOM AE titles: up to 16 characters of the default repertoire, no backslash or controls;
# leading and trailing spaces are not significant, so we refuse them rather than strip them
AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_ae_title(value: str) -> str:
    if not AE_TITLE.fullmatch(value):
        raise ValueError(
            f"invalid AE title {value[:20]!r}: 1-16 printable ASCII characters, no backslash, "
            "no leading or trailing space"
        )
    return value


class DimseDestination(BaseModel):
    """A DICOM node that takes the SEG by C-STORE (e.g. the PACS's own AE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["dimse"] = "dimse"
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(description="the called AE title of the destination")
    calling_ae_title: str | None = Field(
        default=None, description="our AE title when calling it; default SITEFIT_DICOM_AE_TITLE"
    )

    @field_validator("ae_title")
    @classmethod
    def _called_ok(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)


class DicomWebDestination(BaseModel):
    """A DICOMweb server that takes the SEG by STOW-RS (``POST {url}/studies``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["dicomweb"] = "dicomweb"
    url: str = Field(description="the DICOMweb root, e.g. http://pacs:8042/dicom-web")
    bearer_token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url_ok(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("a DICOMweb destination's url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both username and password")
        if self.bearer_token is not None and self.username is not None:
            raise ValueError("give a bearer_token or a username and password, not both")
        return self


AnyDestination = DimseDestination | DicomWebDestination
Destination = Annotated[AnyDestination, Field(discriminator="kind")]


class Route(BaseModel):
    """What a series sent to this route becomes (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, max_length=80, description="NAME or NAME@VERSION")
    mode: Mode = "auto"
    site: str | None = Field(
        default=None, description="fixed site; null: derived from the series' scanner headers"
    )
    ae_title: str | None = Field(
        default=None, description="the called AE title that selects this route over DIMSE"
    )
    destinations: tuple[str, ...] = Field(
        default=(), description="names in SITEFIT_DICOM_DESTINATIONS the SEG is sent to"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)


def check_routes(routes: dict[str, Route], destinations: dict[str, AnyDestination]) -> None:
    """Refuse route names that are not safe directory names, unknown destinations, and an AE
    title used by two routes (``ValueError``, for the settings' validator)."""
    seen: dict[str, str] = {}
    for name, route in routes.items():
        if not ROUTE_NAME.fullmatch(name):
            raise ValueError(f"invalid route name {name[:40]!r}: 1-64 letters, digits, . _ -")
        for target in route.destinations:
            if target not in destinations:
                raise ValueError(f"route {name!r} sends to unknown destination {target[:40]!r}")
        if route.ae_title is not None:
            if route.ae_title in seen:
                raise ValueError(
                    f"routes {seen[route.ae_title]!r} and {name!r} share the AE title "
                    f"{route.ae_title!r}"
                )
            seen[route.ae_title] = name


__all__ = [
    "AE_TITLE",
    "ROUTE_NAME",
    "AnyDestination",
    "Destination",
    "DicomWebDestination",
    "DimseDestination",
    "Route",
    "check_ae_title",
    "check_routes",
]
