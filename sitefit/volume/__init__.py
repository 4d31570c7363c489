"""Volume I/O and geometry, shared by the HTTP server and the worker (numpy + nibabel, no torch).

Scans are single-file NIfTI-1 or NIfTI-2 (``.nii``/``.nii.gz``). :func:`read_header`
validates a file from its header alone (the server's upload check); :func:`load_scan` reads
the voxels into canonical (RAS+) voxel order, refusing intensities no model can use
(:func:`check_intensities`, which the DICOM reader applies too); :func:`mask_to_image` maps a
canonical mask back onto the input's exact grid and :func:`save_image_atomic` writes it.
Canonicalisation only permutes and flips axes (no resampling), so the way back is exact for
oblique and non-RAS inputs.

Errors are :class:`~sitefit.exceptions.VolumeReadError` (the file cannot be read) and
:class:`~sitefit.exceptions.VolumeContentError` (it was read but is unusable), each with one
line that starts with the file's base name and says what was expected; messages never quote
header text.
"""

from sitefit.volume.arrays import from_slices, minmax_normalize, pad_to_multiple, to_slices
from sitefit.volume.header import MAX_DATA_OFFSET, SourceGeometry, read_header
from sitefit.volume.nifti import (
    AFFINE_TOLERANCE_MM,
    Scan,
    check_intensities,
    load_label_map,
    load_scan,
    mask_to_image,
    save_image_atomic,
)

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "MAX_DATA_OFFSET",
    "Scan",
    "SourceGeometry",
    "check_intensities",
    "from_slices",
    "load_label_map",
    "load_scan",
    "mask_to_image",
    "minmax_normalize",
    "pad_to_multiple",
    "read_header",
    "save_image_atomic",
    "to_slices",
]
