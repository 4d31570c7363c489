"""Base models: source-trained U-Net + early head, versioned, verified on every read.

Layout under the registry's root (``$SITEFIT_HOME/models``)::

    NAME/VERSION/weights.safetensors   tensors as numpy arrays (safetensors, no pickle)
    NAME/VERSION/spec.json             ModelSpec, with the weights' sha256
    NAME/VERSION/spec.json.sha256      spec.json's own sha256, checked on every read

A version is published with the backend's ``create_exclusive`` (staged, then renamed into
place), so a reader never sees a half-registered model and two registrations never share a
version number.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from model_store.backend import StorageBackend, backend_of, read_checked, with_checksum
from model_store.files import sha256_bytes
from model_store.spec import NAME_PATTERN, ModelSpec, check_name
from sitefit.exceptions import (
    InvalidInputError,
    ModelNotFoundError,
    ModelStoreError,
    VersionConflictError,
)

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits, no leading zero
REGISTER_ATTEMPTS = 50  # registrations lost to other processes before giving up
Tensors = dict[str, np.ndarray]


class UnreadableModel(BaseModel):
    """A model whose latest version's spec cannot be read: listed, not hidden."""

    name: str
    version: int
    reason: str


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``"brain"`` -> (brain, None: latest); ``"brain@3"`` -> (brain, 3)."""
    name, _, version = ref.partition("@")
    try:
        check_name("model", name)
    except ValueError as error:
        raise InvalidInputError(str(error)) from None
    if not version or version == "latest":
        return name, None
    if not VERSION_PATTERN.fullmatch(version):
        raise InvalidInputError(f"invalid model version {version!r}: expected a positive integer")
    return name, int(version)


def version_numbers(names: list[str]) -> list[int]:
    """The positive integers among directory names, sorted."""
    # str.isdigit() would also accept "²" and "١٠", which int() refuses or misreads
    return sorted(int(n) for n in names if VERSION_PATTERN.fullmatch(n))


class BaseModelRegistry:
    """Register, resolve and load base models under a backend (or a directory)."""

    def __init__(self, root: StorageBackend | Path) -> None:
        self.backend = backend_of(root)

    def names(self) -> list[str]:
        return [name for name in self.backend.children() if self.versions(name)]

    def versions(self, name: str) -> list[int]:
        if not NAME_PATTERN.fullmatch(name):
            return []
        return version_numbers(self.backend.children(name))

    def catalog(
        self, *, unreadable: list[UnreadableModel] | None = None
    ) -> list[tuple[ModelSpec, list[int]]]:
        """Each model's latest spec with its version numbers, by name. A latest spec that
        cannot be read raises :class:`ModelStoreError`; given an ``unreadable`` list, it is
        appended there instead and its model left out, so one bad file hides no other model."""
        entries = []
        for name in self.names():
            versions = self.versions(name)
            try:
                entries.append((self.spec(f"{name}@{versions[-1]}"), versions))
            except ModelStoreError as error:
                if unreadable is None:
                    raise
                unreadable.append(
                    UnreadableModel(name=name, version=versions[-1], reason=str(error))
                )
        return entries

    def register(self, spec: ModelSpec, tensors: Tensors) -> ModelSpec:
        """Store ``tensors`` as the next version of ``spec.name``; returns the stored spec."""
        return self.register_payload(spec, save_tensors(tensors))

    def register_payload(self, spec: ModelSpec, payload: bytes) -> ModelSpec:
        """Store an already serialised safetensors file, byte for byte, as the next version."""
        checksum = sha256_bytes(payload)
        floor = 0
        for _ in range(REGISTER_ATTEMPTS):
            version = max(*self.versions(spec.name), floor, 0) + 1
            stored = spec.model_copy(update={"version": version, "sha256": checksum})
            files = {WEIGHTS_FILE: payload, SPEC_FILE: stored.model_dump_json(indent=2).encode()}
            files = with_checksum(files, SPEC_FILE)
            if self.backend.create_exclusive(f"{spec.name}/{version}", files):
                return stored
            # another process published this version first: take the next number, past it
            # even when a listing lags behind (NFS attribute caching)
            floor = version
        raise VersionConflictError(
            f"model {spec.name!r}: gave up after {REGISTER_ATTEMPTS} conflicting registrations"
        )

    def spec(self, ref: str) -> ModelSpec:
        """The spec of ``NAME`` (latest) or ``NAME@VERSION``."""
        name, version = parse_model_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none registered"
            raise ModelNotFoundError(f"unknown model {name!r} (available: {known})")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version} (has {versions})")
        try:
            raw = read_checked(self.backend, f"{name}/{version}/{SPEC_FILE}")
        except ModelStoreError as error:
            raise ModelStoreError(f"model {name}@{version}: unreadable spec ({error})") from None
        try:
            spec = ModelSpec.model_validate_json(raw)
        except ValidationError as error:
            raise ModelStoreError(
                f"model {name}@{version}: unreadable spec ({error.error_count()} error(s))"
            ) from None
        if (spec.name, spec.version) != (name, version):
            raise ModelStoreError(f"model {name}@{version}: spec names {spec.ref}")
        return spec

    def payload(self, spec: ModelSpec) -> bytes:
        """The verified bytes of a resolved spec's weights file."""
        payload = self.backend.read(f"{spec.name}/{spec.version}/{WEIGHTS_FILE}")
        if sha256_bytes(payload) != spec.sha256:
            raise ModelStoreError(f"model {spec.ref}: weights fail their checksum (corrupt file)")
        return payload

    def tensors(self, spec: ModelSpec) -> Tensors:
        """Load and verify the weights of a resolved spec."""
        try:
            return parse_weights(self.payload(spec))
        except ValueError as error:
            raise ModelStoreError(f"model {spec.ref}: unreadable weights ({error})") from None


def parse_weights(payload: bytes) -> Tensors:
    """A safetensors file's tensors; anything else raises ``ValueError``."""
    try:
        return load_tensors(payload)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"not a safetensors file ({type(error).__name__})") from None
