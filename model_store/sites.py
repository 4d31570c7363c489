"""Per-site adapted weights, stored as deltas on a base model, versioned with history.

A delta holds exactly the tensors the caller passes (what refinement changed: the init-path
weights, and the BN buffers when the BN option moves them), keyed to the base model's sha256,
so it can never be applied to another base model. Layout under the store's root
(``$SITEFIT_HOME/sites``)::

    SITE/MODEL/VERSION/delta.safetensors.gz   safetensors (no pickle), gzip'd (mtime 0)
    SITE/MODEL/VERSION/meta.json              SiteVersion, with the delta file's sha256
    SITE/MODEL/VERSION/meta.json.sha256       meta.json's own sha256, checked on every read

Versions count 1, 2, 3, ... per (site, model). Saving version N publishes the directory
``N`` with the backend's ``create_exclusive``: if another worker published it first, the
save fails with :class:`VersionConflictError` (a compare-and-set on the version); nothing
is ever overwritten, so there are no torn or mixed files and the history has no gaps.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

import sitefit
from model_store.backend import StorageBackend, backend_of, read_checked, with_checksum
from model_store.base_models import version_numbers
from model_store.delta import decode_delta, encode_delta
from model_store.files import sha256_bytes
from model_store.spec import NAME_PATTERN, ModelSpec, check_name
from sitefit.exceptions import (
    IncompatibleDeltaError,
    InvalidInputError,
    ModelStoreError,
    SiteNotFoundError,
    VersionConflictError,
)

DELTA_FILE = "delta.safetensors.gz"
META_FILE = "meta.json"
APPEND_ATTEMPTS = 50
Tensors = dict[str, np.ndarray]


class SiteVersion(BaseModel):
    """One saved version of a site's adapted weights for one base model (``meta.json``)."""

    site: str
    model: str = Field(description="base model name")
    version: int = Field(ge=1)
    base_sha256: str = Field(description="sha256 of the base model's weights the delta is for")
    base_version: int | None = Field(default=None, description="base model version, for humans")
    sha256: str = Field(description="sha256 of the delta file as stored")
    created: datetime
    scans_refined: int = Field(ge=0)
    self_consistency_before: float | None
    self_consistency_after: float | None
    refinement_epochs: int = Field(ge=0)
    sitefit_version: str
    rolled_back_from: int | None = None
    job_id: str | None = Field(
        default=None, description="the job that saved it (none: the CLI, a benchmark, a rollback)"
    )
    nbytes: int = Field(ge=0, description="size of the delta file as stored")
    tensors: int = Field(default=0, ge=0, description="number of tensors in the delta")


class UnreadableVersion(BaseModel):
    """A version whose files cannot be read (missing, torn or corrupt): listed, not hidden."""

    version: int
    reason: str


def check_site(site: str) -> str:
    try:
        return check_name("site", site)
    except ValueError as error:
        raise InvalidInputError(str(error)) from None


def _check_model(model: str) -> str:
    try:
        return check_name("model", model)
    except ValueError as error:
        raise InvalidInputError(str(error)) from None


class SiteStore:
    """Versioned site deltas on a :class:`StorageBackend` (or a directory).

    ``integrity_errors`` counts the missing, torn or corrupt files (delta or meta.json) this
    instance has met; every such read raises :class:`ModelStoreError`.
    """

    def __init__(self, backend: StorageBackend | Path) -> None:
        self.backend = backend_of(backend)
        self.integrity_errors = 0

    # -- reading ------------------------------------------------------------------------------

    def sites(self) -> list[str]:
        """Sites with at least one saved version."""
        names = self.backend.children()
        return [site for site in names if NAME_PATTERN.fullmatch(site) and self.models_of(site)]

    def models_of(self, site: str) -> list[str]:
        """Base model names ``site`` has saved versions for."""
        check_site(site)
        return [m for m in self.backend.children(site) if self._versions(site, m)]

    def history(
        self, site: str, model: str, *, unreadable: list[UnreadableVersion] | None = None
    ) -> list[SiteVersion]:
        """Every version of ``site`` for ``model``, oldest first (``[]`` when none).

        A version whose meta.json cannot be read raises :class:`ModelStoreError`; given an
        ``unreadable`` list, it is appended there instead (and counted), so that one bad
        file does not hide the good versions from an operator choosing one to roll back to.
        """
        check_site(site)
        _check_model(model)
        found = []
        for version in self._versions(site, model):
            try:
                found.append(self._meta(site, model, version))
            except ModelStoreError as error:
                if unreadable is None:
                    raise
                unreadable.append(UnreadableVersion(version=version, reason=str(error)))
        return found

    def versions(self, site: str, model: str) -> list[int]:
        """The version numbers of ``site`` for ``model``, from the listing alone."""
        check_site(site)
        _check_model(model)
        return self._versions(site, model)

    def latest_number(self, site: str, model: str) -> int | None:
        """The number of ``site``'s latest version for ``model`` (None when none), read from
        the listing alone: known even where that version's files are unreadable."""
        versions = self.versions(site, model)
        return versions[-1] if versions else None

    def latest(self, site: str, model: str) -> SiteVersion | None:
        check_site(site)
        _check_model(model)
        versions = self._versions(site, model)
        return self._meta(site, model, versions[-1]) if versions else None

    def version(self, site: str, model: str, version: int) -> SiteVersion:
        """The metadata of one version; :class:`SiteNotFoundError` when there is no such one."""
        check_site(site)
        _check_model(model)
        if version not in self._versions(site, model):
            raise SiteNotFoundError(f"site {site!r} has no version {version} for model {model!r}")
        return self._meta(site, model, version)

    def load(self, site: str, version: SiteVersion | int, base: ModelSpec) -> Tensors:
        """The verified delta tensors of ``site`` for the base model ``base``.

        Raises :class:`IncompatibleDeltaError` when the delta was made for another base model,
        :class:`ModelStoreError` when its file is missing, torn or corrupt, and
        :class:`SiteNotFoundError` for a version number the site does not have.
        """
        meta = (
            version if isinstance(version, SiteVersion) else self.version(site, base.name, version)
        )
        if (meta.site, meta.model) != (site, base.name):
            raise IncompatibleDeltaError(
                f"site version {meta.site}/{meta.model}@{meta.version} does not belong to "
                f"site {site!r} and model {base.name!r}"
            )
        if meta.base_sha256 != base.sha256:
            raise IncompatibleDeltaError(
                f"site {site!r} version {meta.version} was adapted from base model "
                f"{meta.model} sha256 {meta.base_sha256[:12]} (version {meta.base_version}), "
                f"not {base.name}@{base.version} sha256 {base.sha256[:12]}"
            )
        data = self._delta_bytes(meta)
        try:
            return decode_delta(data)
        except ValueError as error:
            self.integrity_errors += 1
            raise ModelStoreError(f"{_where(meta)}: unreadable delta ({error})") from None

    # -- writing ------------------------------------------------------------------------------

    def save(
        self,
        site: str,
        base: ModelSpec,
        tensors: Tensors,
        *,
        expected_version: int | None,
        scans_refined: int,
        self_consistency_before: float | None,
        self_consistency_after: float | None,
        refinement_epochs: int,
        job_id: str | None = None,
    ) -> SiteVersion:
        """Save ``tensors`` as version ``expected_version + 1`` (1 when ``None``).

        ``expected_version`` is the version the caller started from; if another writer has
        saved since, :class:`VersionConflictError` (compare-and-set). See :meth:`append`.
        """
        meta, data = self._new_version(
            site, base, tensors, expected_version, scans_refined, self_consistency_before,
            self_consistency_after, refinement_epochs,
        )  # fmt: skip
        meta = meta.model_copy(update={"job_id": job_id})
        current = self._versions(site, base.name)
        if current[-1:] != ([] if expected_version is None else [expected_version]):
            found = current[-1] if current else None
            raise VersionConflictError(
                f"site {site!r} model {base.name!r}: expected latest version "
                f"{expected_version}, found {found}; reload and retry"
            )
        return self._create(meta, data)

    def append(
        self,
        site: str,
        base: ModelSpec,
        tensors: Tensors,
        *,
        scans_refined: int,
        self_consistency_before: float | None,
        self_consistency_after: float | None,
        refinement_epochs: int,
    ) -> SiteVersion:
        """Save as the next version after whatever is latest, retrying on conflicts."""
        meta, data = self._new_version(
            site, base, tensors, None, scans_refined, self_consistency_before,
            self_consistency_after, refinement_epochs,
        )  # fmt: skip
        return self._retry(meta, data)

    def rollback(self, site: str, model: str, version: int) -> SiteVersion:
        """A new version whose delta is bitwise that of ``version`` (the history is kept)."""
        old = self.version(site, model, version)
        data = self._delta_bytes(old)
        update = {
            "created": datetime.now(UTC),
            "sitefit_version": sitefit.__version__,
            "job_id": None,  # a rollback is no job's
        }
        return self._retry(old.model_copy(update={**update, "rolled_back_from": version}), data)

    def delete(self, site: str, model: str | None = None) -> None:
        """Delete a site's versions for one model, or the whole site with every model."""
        check_site(site)
        if model is not None:
            _check_model(model)
            if not self._versions(site, model):
                raise SiteNotFoundError(f"site {site!r} has no adapted weights for {model!r}")
            self.backend.delete(f"{site}/{model}")
            return
        if not self.backend.children(site):
            raise SiteNotFoundError(f"unknown site {site!r}")
        self.backend.delete(site)

    # -- internals ----------------------------------------------------------------------------

    def _new_version(
        self,
        site: str,
        base: ModelSpec,
        tensors: Tensors,
        expected: int | None,
        scans_refined: int,
        before: float | None,
        after: float | None,
        epochs: int,
    ) -> tuple[SiteVersion, bytes]:
        check_site(site)
        if expected is not None and expected < 1:
            raise InvalidInputError(f"expected_version must be None or >= 1, not {expected}")
        data = encode_delta(tensors)
        meta = SiteVersion(
            site=site,
            model=base.name,
            version=(expected or 0) + 1,
            base_sha256=base.sha256,
            base_version=base.version,
            sha256=sha256_bytes(data),
            created=datetime.now(UTC),
            scans_refined=scans_refined,
            self_consistency_before=before,
            self_consistency_after=after,
            refinement_epochs=epochs,
            sitefit_version=sitefit.__version__,
            nbytes=len(data),
            tensors=len(tensors),
        )
        return meta, data

    def _create(self, meta: SiteVersion, data: bytes) -> SiteVersion:
        """Publish version ``meta.version``: the compare-and-set itself."""
        files = {DELTA_FILE: data, META_FILE: meta.model_dump_json(indent=2).encode()}
        files = with_checksum(files, META_FILE)
        key = self._key(meta.site, meta.model, meta.version)
        # a version after the first needs the site's history to still be there: a site
        # deleted while a job refined it stays deleted
        if not self.backend.create_exclusive(key, files, parent_must_exist=meta.version > 1):
            raise VersionConflictError(
                f"{_where(meta)}: another writer saved this version, or deleted the site, "
                f"first; reload and retry"
            )
        return meta

    def _retry(self, template: SiteVersion, data: bytes) -> SiteVersion:
        """Publish ``template`` as the version after the latest, until it wins.

        A lost compare-and-set proves its version exists, so the next attempt goes past it
        even when a listing lags behind (NFS attribute caching).
        """
        floor = 0
        for _ in range(APPEND_ATTEMPTS):
            versions = self._versions(template.site, template.model)
            version = max(versions[-1] if versions else 0, floor) + 1
            try:
                return self._create(template.model_copy(update={"version": version}), data)
            except VersionConflictError:
                floor = version
        raise VersionConflictError(
            f"site {template.site!r} model {template.model!r}: gave up after "
            f"{APPEND_ATTEMPTS} conflicting saves"
        )

    @staticmethod
    def _key(site: str, model: str, version: int, name: str | None = None) -> str:
        key = f"{site}/{model}/{version}"
        return f"{key}/{name}" if name else key

    def _versions(self, site: str, model: str) -> list[int]:
        if not NAME_PATTERN.fullmatch(model):
            return []
        return version_numbers(self.backend.children(f"{site}/{model}"))

    def _meta(self, site: str, model: str, version: int) -> SiteVersion:
        where = f"site {site!r} model {model!r} version {version}"
        try:
            raw = read_checked(self.backend, self._key(site, model, version, META_FILE))
        except ModelStoreError as error:
            self.integrity_errors += 1
            raise ModelStoreError(f"{where}: meta.json {error}") from None
        try:
            meta = SiteVersion.model_validate_json(raw)
        except ValidationError as error:
            self.integrity_errors += 1
            raise ModelStoreError(
                f"{where}: unreadable meta.json ({error.error_count()} error(s))"
            ) from None
        if (meta.site, meta.model, meta.version) != (site, model, version):
            self.integrity_errors += 1
            raise ModelStoreError(
                f"{where}: meta.json describes {meta.site}/{meta.model}@{meta.version}"
            )
        return meta

    def _delta_bytes(self, meta: SiteVersion) -> bytes:
        """The stored delta file of ``meta``, verified against its checksum."""
        try:
            data = self.backend.read(self._key(meta.site, meta.model, meta.version, DELTA_FILE))
        except ModelStoreError as error:
            self.integrity_errors += 1
            raise ModelStoreError(f"{_where(meta)}: delta {error}") from None
        if sha256_bytes(data) != meta.sha256:
            self.integrity_errors += 1
            raise ModelStoreError(f"{_where(meta)}: delta fails its checksum (corrupt file)")
        return data


def _where(meta: SiteVersion) -> str:
    return f"site {meta.site!r} model {meta.model!r} version {meta.version}"
