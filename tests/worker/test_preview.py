"""The preview: a bounded PNG montage of slices with each class's outline, and the base
model's where it differs; for binary and multi-class models and for an empty mask."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from sitefit.settings import Settings
from sitefit.volume import load_label_map, load_scan
from tests.conftest import PhantomCase
from worker.engine import Engine, SegmentRequest
from worker.preview import (
    BASE_COLOUR,
    CLASS_COLOURS,
    DPI,
    MAX_BYTES,
    MAX_SLICES,
    PANEL_PX,
    PreviewData,
    PreviewError,
    choose_slices,
    render_preview,
)

HEADER_PX, FOOTER_PX = 35, 45  # the title's and the legend's bands (worker.preview)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return Engine(settings)


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


def _panels(png: bytes) -> np.ndarray:
    """The montage's pixels (RGB) without its title and legend bands: where outlines go."""
    rgb = np.asarray(_decode(png).convert("RGB"))
    return rgb[HEADER_PX:-FOOTER_PX]


def _has(pixels: np.ndarray, colour: str) -> bool:
    wanted = np.array([round(c * 255) for c in to_rgb(colour)])
    return bool((np.abs(pixels.astype(int) - wanted).max(axis=-1) <= 2).any())


def _data(mask: np.ndarray, base: np.ndarray | None = None, **kw: Any) -> PreviewData:
    rng = np.random.default_rng(0)
    values: dict[str, Any] = dict(
        image=rng.normal(100, 20, mask.shape).astype(np.float32),
        mask=mask,
        base=base,
        slice_axis=2,
        spacing_mm=(1.0, 1.0, 2.0),
        classes={0: "background", 1: "LV", 2: "RV"},
        title="tiny@1, mode adapt",
    )
    values.update(kw)
    return PreviewData(**values)


def test_binary_model_preview_outlines_the_mask_and_the_base_where_it_differs(
    engine: Engine, brain_model: str, shifted_brain_case: PhantomCase
) -> None:
    result = engine.run(SegmentRequest(shifted_brain_case.image, brain_model, mode="adapt"))
    data = result.preview
    assert data is not None and data.slice_axis == result.spec.slice_axis
    assert data.mask.any() and data.base is not None  # the premise: an outline to draw
    png = render_preview(data)
    assert len(png) <= MAX_BYTES
    pixels = _panels(png)
    assert _has(pixels, CLASS_COLOURS[0])
    differs = any(
        not np.array_equal(np.take(data.mask, i, data.slice_axis) == 1,
                           np.take(data.base, i, data.slice_axis) == 1)
        for i in choose_slices(data)
    )  # fmt: skip
    assert _has(pixels, BASE_COLOUR) == differs


def test_multiclass_model_preview_has_a_colour_per_class(
    engine: Engine, settings: Settings, heart_model: str, shifted_heart_case: PhantomCase
) -> None:
    """The tiny heart model's own output (often empty) renders; with the case's reference
    labels as the output, each class shown gets its colour."""
    result = engine.run(SegmentRequest(shifted_heart_case.image, heart_model, mode="none"))
    own = result.preview
    assert own is not None and own.base is None  # mode none: the output is the base model's
    assert len(render_preview(own)) <= MAX_BYTES
    scan = load_scan(shifted_heart_case.image, settings.max_voxels)
    labels = load_label_map(shifted_heart_case.label, like=scan)
    data = dataclasses.replace(own, mask=labels)
    png = render_preview(data)
    assert len(png) <= MAX_BYTES
    pixels = _panels(png)
    on_slices = np.take(data.mask, choose_slices(data), axis=data.slice_axis)
    shown = {int(label) for label in np.unique(on_slices) if label}
    assert len(shown) == 3, "premise: every class is labelled on the slices shown"
    for label in sorted(label for label in data.classes if label):
        assert _has(pixels, CLASS_COLOURS[label - 1]), data.classes[label]
    assert not _has(pixels, BASE_COLOUR)


def test_an_empty_mask_renders_the_image_alone() -> None:
    data = _data(np.zeros((40, 40, 30), np.uint8))
    png = render_preview(data)
    assert choose_slices(data) == [int((i + 0.5) * 30 / MAX_SLICES) for i in range(MAX_SLICES)]
    pixels = _panels(png)
    assert not any(_has(pixels, colour) for colour in (*CLASS_COLOURS, BASE_COLOUR))
    assert pixels.std() > 10  # the image is there


def test_the_size_is_bounded_even_for_a_large_scan_of_pure_noise() -> None:
    """The worst case for PNG compression: uniform noise on every pixel of every panel."""
    shape = (320, 320, 60)
    mask = np.zeros(shape, np.uint8)
    mask[60:260, 50:250, 5:55], mask[120:200, 120:200, 5:55] = 1, 2
    base = mask.copy()
    base[40:280, 40:270, 10:40] = 1
    data = _data(mask, base, image=np.random.default_rng(1).random(shape, dtype=np.float32))
    png = render_preview(data)
    assert len(png) <= MAX_BYTES
    image = _decode(png)
    columns = 3
    assert image.width <= columns * (PANEL_PX + 5) and image.height <= 3 * (PANEL_PX + 5) + 80


def test_slices_span_the_labelled_range_along_the_slice_axis() -> None:
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[5:15, 10:20, 8:12] = 1
    base = np.zeros_like(mask)
    base[5:15, 10:20, 30] = 1  # the base model labels slice 30 too: it is in the range
    assert choose_slices(_data(mask)) == [8, 9, 10, 11]  # fewer labelled slices than panels
    spread = choose_slices(_data(mask, base))
    assert len(spread) == MAX_SLICES and spread[0] >= 8 and spread[-1] <= 30
    assert np.diff(spread).min() >= 2  # evenly spaced, not bunched
    sagittal = _data(mask, slice_axis=0, spacing_mm=(1.0, 1.0, 3.0))
    across = choose_slices(sagittal)  # along axis 0 now: 10 labelled slices, 5 to 14
    assert len(across) == MAX_SLICES and across[0] >= 5 and across[-1] <= 14
    # a sagittal panel is 30 voxels across (A) and 40 x 3 mm up (S): taller than wide
    image = _decode(render_preview(sagittal))
    panel_h = (image.height - HEADER_PX - FOOTER_PX) / 3
    assert panel_h == pytest.approx(PANEL_PX, abs=8)
    assert image.width / 3 == pytest.approx(PANEL_PX * 30 / 120, abs=8)
    assert DPI == 100  # the pixel arithmetic above assumes it


def test_arrays_on_different_grids_are_refused() -> None:
    with pytest.raises(PreviewError, match="not on the image's grid"):
        render_preview(_data(np.zeros((10, 10, 10), np.uint8), image=np.ones((10, 10, 9))))


def test_rendering_imports_no_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from worker.preview import PreviewData, render_preview\n"
        "m = np.zeros((16, 16, 8), np.uint8); m[4:12, 4:12, 2:6] = 1\n"
        "img = np.arange(m.size, dtype=np.float32).reshape(m.shape)\n"
        "png = render_preview(PreviewData(img, m, None, 2, (1.0, 1.0, 1.0), {1: 'x'}, 't'))\n"
        "assert png.startswith(b'\\x89PNG') and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
