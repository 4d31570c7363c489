"""sitefit.surfels, against DeepMind's surface-distance package where it defines the same."""

import itertools

import numpy as np
import pytest
from scipy import ndimage
from surface_distance import lookup_tables

from sitefit.surfels import bounding_box, is_surfel, neighbour_codes, surfel_area_table

SPACINGS = [(1.0, 1.0, 1.0), (0.9, 1.1, 1.5), (1.0, 1.0, 2.0), (0.5, 0.5, 3.0), (2.0, 0.8, 1.2)]

# The package calls scipy.ndimage.filters / .morphology, deprecated aliases.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_bounding_box_is_half_open_and_none_for_an_empty_mask() -> None:
    mask = np.zeros((5, 6, 7), bool)
    assert bounding_box(mask) is None
    mask[1, 2:4, 6] = True
    assert bounding_box(mask) == ((1, 2), (2, 4), (6, 7))


def test_one_voxel_has_eight_corner_surfels_that_close_a_unit_cube() -> None:
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    box = bounding_box(mask)
    assert box is not None
    codes = neighbour_codes(mask, box, (0, 0, 0))
    assert codes.shape == (2, 2, 2)
    assert np.count_nonzero(is_surfel(codes)) == 8
    # each corner holds one of the cube's eight corner triangles (normal (1, 1, 1) / 8)
    areas = surfel_area_table((1.0, 1.0, 1.0))[codes.ravel()]
    assert np.allclose(areas, np.sqrt(3) / 8)


def test_uniform_cubes_are_not_surfels_and_a_code_and_its_complement_share_an_area() -> None:
    codes = np.arange(256, dtype=np.uint8)
    surfel = is_surfel(codes)
    assert not surfel[0] and not surfel[255] and surfel[1:255].all()
    table = surfel_area_table((0.8, 1.0, 2.5))
    assert np.array_equal(table, table[::-1])
    assert table[0] == 0.0 and not table.flags.writeable


@pytest.mark.parametrize("spacing", [*SPACINGS, (0.3, 2.7, 1.0)])
def test_area_table_is_the_packages(spacing: tuple[float, float, float]) -> None:
    expected = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    table = surfel_area_table(spacing)
    np.testing.assert_allclose(table, expected, rtol=1e-14, atol=0)
    assert table[0] == table[255] == 0
    assert np.all(table[1:255] > 0)  # every mixed cube is a surfel with some area


def test_neighbour_codes_are_the_packages_encoding() -> None:
    # One voxel at each of the eight positions of a 2x2x2 cube gives the kernel's bit there.
    for a, b, c in itertools.product((0, 1), repeat=3):
        mask = np.zeros((2, 2, 2), dtype=bool)
        mask[a, b, c] = True
        codes = neighbour_codes(mask, ((0, 2), (0, 2), (0, 2)), (0, 0, 0))
        expected = ndimage.correlate(
            np.pad(mask, ((0, 1), (0, 1), (0, 1))).astype(np.uint8),
            lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL,
            mode="constant",
            cval=0,
        )
        np.testing.assert_array_equal(codes, expected)
