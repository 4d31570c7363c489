"""Every error sitefit raises on purpose, in one flat module.

Each class says what kind of failure it is; the CLI prints ``str(error)`` as one line and the
HTTP layer maps the classes to status codes in one place. Messages never contain PHI.
"""


class SitefitError(Exception):
    """Base class: a failure sitefit understands and can explain in one line."""


class InvalidInputError(SitefitError):
    """The caller's input (a scan, a mask, a dataset, an argument) is unusable."""


class VolumeReadError(InvalidInputError):
    """A scan or mask file cannot be read: missing, truncated, not NIfTI, ..."""


class VolumeContentError(InvalidInputError):
    """A scan was read but its content is unusable: wrong rank, NaN/Inf, constant, too large."""


class DatasetError(InvalidInputError):
    """A training dataset is not a usable nnU-Net v2 raw dataset."""


class ModelNotFoundError(SitefitError):
    """No base model of that name (or version) is registered in the model store."""


class SiteNotFoundError(SitefitError):
    """The site has no adapted weights in the model store."""


class ModelStoreError(SitefitError):
    """The model store is inconsistent: a checksum mismatch, a torn or missing file."""


class IncompatibleDeltaError(ModelStoreError):
    """A site delta was made for a different base model than the one it is applied to."""


class VersionConflictError(ModelStoreError):
    """A compare-and-set on a site's version lost against a concurrent writer."""


class DeviceUnavailableError(SitefitError):
    """The requested compute device (e.g. ``cuda``) is not available on this machine."""
