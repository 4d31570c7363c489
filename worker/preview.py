"""The preview: one PNG a person can judge a result by at a glance, without a viewer.

A montage of evenly spaced slices along the model's slice axis of the canonical (RAS+) scan,
each with the output mask's outline over the image (a colour per class, named in a legend)
and, on the slices where the base model's mask differs from the output, the base model's
outline too (dashed, in one colour of its own). The slices span the labelled part of the
volume (the union of both masks), or the whole volume when nothing is labelled. Each panel
is shown with the slice's first remaining canonical axis to the right and the second up
(axial: the patient's right on the right, anterior up), at the voxels' true aspect ratio.

matplotlib draws it (the object API on an Agg canvas: no pyplot state, no display, safe in a
worker thread); contours are matplotlib's. The size is bounded: at most :data:`MAX_SLICES`
panels of :data:`PANEL_PX` pixels, encoded as a palette PNG of :data:`GREYS` grey levels and
the outlines' colours, and re-encoded with fewer greys in the rare case (a scan of pure
noise) that it would still exceed :data:`MAX_BYTES`. Only numpy and matplotlib are needed
(Pillow, which matplotlib requires, makes the palette): no torch.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_SLICES = 9
COLUMNS = 3
PANEL_PX = 200  # each panel's longer side, in pixels
DPI = 100
GREYS = 48  # grey levels of the palette (the outlines' colours are added to them)
MAX_BYTES = 300_000
# outline colours per foreground class, in label order (cycled beyond six classes); chosen
# to stand out on a grey image and from the base model's colour
CLASS_COLOURS = ("#ffd60a", "#00e5ff", "#ff453a", "#30d158", "#ff9f0a", "#5e5ce6")
BASE_COLOUR = "#ff2bd6"


class PreviewError(Exception):
    """The preview cannot be drawn: arrays that do not fit together (a bug, never the
    user's input), or a picture over the size bound."""


@dataclass(frozen=True, eq=False)
class PreviewData:
    """What a preview is drawn from, all in canonical (RAS+) voxel order."""

    image: npt.NDArray[np.floating[Any]]  # the scan's intensities
    mask: npt.NDArray[np.integer[Any]]  # the output's labels
    base: npt.NDArray[np.integer[Any]] | None  # the base model's labels; None: the output's
    slice_axis: int
    spacing_mm: tuple[float, float, float]
    classes: Mapping[int, str]  # label -> name, background (0) included or not
    title: str  # one line above the montage (model, mode): never patient data


def choose_slices(data: PreviewData, count: int = MAX_SLICES) -> list[int]:
    """Up to ``count`` evenly spaced slice indices: the centres of ``count`` equal parts of
    the labelled range (both masks), or of the whole axis when nothing is labelled."""
    axis = data.slice_axis
    others = tuple(a for a in range(3) if a != axis)
    labelled = np.asarray(data.mask != 0).any(axis=others)
    if data.base is not None:
        labelled |= np.asarray(data.base != 0).any(axis=others)
    found = np.flatnonzero(labelled)
    low, high = (int(found[0]), int(found[-1]) + 1) if found.size else (0, labelled.size)
    length = high - low
    if length <= count:
        return list(range(low, high))
    return [low + int((i + 0.5) * length / count) for i in range(count)]


def render_preview(data: PreviewData) -> bytes:
    """The preview of ``data`` as PNG bytes (at most :data:`MAX_BYTES`)."""
    if data.image.ndim != 3 or data.mask.shape != data.image.shape:
        raise PreviewError(f"mask {data.mask.shape} is not on the image's grid {data.image.shape}")
    if data.base is not None and data.base.shape != data.image.shape:
        raise PreviewError(f"base mask {data.base.shape} is not on the image's grid")
    if data.slice_axis not in (0, 1, 2):
        raise PreviewError(f"slice axis {data.slice_axis} is not 0, 1 or 2")
    figure = _draw(data, choose_slices(data))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    for greys in (GREYS, GREYS // 2, GREYS // 4):
        png = _palette_png(buffer.getvalue(), greys)
        if len(png) <= MAX_BYTES:
            return png
    raise PreviewError(f"the preview takes {len(png):,} bytes, over {MAX_BYTES:,}")


def _draw(data: PreviewData, indices: list[int]) -> Figure:
    # imported here: the engine imports this module for PreviewData alone, and matplotlib
    # takes a noticeable time to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    axis = data.slice_axis
    across, up = (a for a in range(3) if a != axis)
    width, height = data.image.shape[across], data.image.shape[up]
    # the panel's shape in millimetres sets its aspect; the longer side gets PANEL_PX
    aspect = data.spacing_mm[up] / data.spacing_mm[across]
    extent_w, extent_h = width, height * aspect
    scale = PANEL_PX / DPI / max(extent_w, extent_h)
    panel_w, panel_h = extent_w * scale, extent_h * scale
    rows = -(-len(indices) // COLUMNS)
    columns = min(COLUMNS, len(indices))
    header, footer, gap = 0.35, 0.45, 0.04  # inches: the title, the legend, between panels
    size_w = columns * (panel_w + gap)
    size_h = rows * (panel_h + gap) + header + footer
    figure = Figure(figsize=(size_w, size_h), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    low, high = _window(data.image)
    labels = sorted(label for label in data.classes if label != 0)
    colours = {label: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, label in enumerate(labels)}
    base_shown = False
    for i, index in enumerate(indices):
        row, column = divmod(i, COLUMNS)
        left = column * (panel_w + gap) + gap / 2
        bottom = footer + (rows - 1 - row) * (panel_h + gap) + gap / 2
        rect = (left / size_w, bottom / size_h, panel_w / size_w, panel_h / size_h)
        ax = figure.add_axes(rect)
        ax.set_axis_off()
        plane = np.take(data.image, index, axis=axis).T
        ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect,
                  interpolation="antialiased")  # fmt: skip
        mask = np.take(data.mask, index, axis=axis).T
        base = None if data.base is None else np.take(data.base, index, axis=axis).T
        for label in labels:
            output = mask == label
            _outline(ax, output, colours[label], "solid", aspect)
            if base is not None:
                before = base == label
                if not np.array_equal(before, output):
                    base_shown |= _outline(ax, before, BASE_COLOUR, "dashed", aspect)
        ax.text(0.02, 0.98, f"{index + 1}/{data.image.shape[axis]}", color="white",
                fontsize=7, va="top", transform=ax.transAxes)  # fmt: skip
    figure.text(0.5, 1 - 0.5 * header / size_h, data.title, color="white", fontsize=9,
                ha="center", va="center")  # fmt: skip
    handles = [Line2D([], [], color=colours[label], label=data.classes[label]) for label in labels]
    if base_shown:
        handles.append(Line2D([], [], color=BASE_COLOUR, linestyle="dashed",
                              label="base model, where it differs"))  # fmt: skip
    if not data.mask.any():
        handles.append(Line2D([], [], color="none", label="nothing labelled"))
    legend = figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4),
                           fontsize=7, frameon=False, labelcolor="white",
                           bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    legend.set_in_layout(False)
    return figure


def _window(image: npt.NDArray[np.floating[Any]]) -> tuple[float, float]:
    """The grey window: the 1st to the 99.5th percentile (a few bright voxels do not darken
    the rest), from at most about a million voxels (a large scan costs no more)."""
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    low, high = (float(v) for v in np.percentile(sample, (1.0, 99.5)))
    return (low, high) if high > low else (float(flat.min()), float(flat.max()))


def _outline(
    ax: Any, region: npt.NDArray[np.bool_], colour: str, style: str, aspect: float
) -> bool:
    """Draw ``region``'s outline; False when it is empty. The region is padded by one
    background pixel so that an outline touching the border is closed."""
    if not region.any():
        return False
    padded = np.pad(region.astype(np.float32), 1)
    xs = np.arange(-1, region.shape[1] + 1)
    ys = np.arange(-1, region.shape[0] + 1)
    ax.contour(xs, ys, padded, levels=[0.5], colors=[colour], linestyles=style,
               linewidths=1.0)  # fmt: skip
    ax.set_xlim(-0.5, region.shape[1] - 0.5)
    ax.set_ylim(-0.5, region.shape[0] - 0.5)
    ax.set_aspect(aspect)
    return True


def _palette_png(png: bytes, greys: int) -> bytes:
    """``png`` re-encoded with a fixed palette: ``greys`` grey levels and the outlines'
    colours (a fixed one: an adaptive palette would spend itself on the image and wash the
    outlines out)."""
    from matplotlib.colors import to_rgb
    from PIL import Image

    ramp = np.linspace(0, 255, greys).round().astype(int)
    entries = [(int(v), int(v), int(v)) for v in ramp]
    for colour in (*CLASS_COLOURS, BASE_COLOUR):
        r, g, b = to_rgb(colour)
        entries.append((round(r * 255), round(g * 255), round(b * 255)))
    palette = Image.new("P", (1, 1))
    palette.putpalette([channel for entry in entries for channel in entry])
    with Image.open(io.BytesIO(png)) as image:
        paletted = image.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE)
    out = io.BytesIO()
    paletted.save(out, format="PNG", optimize=True)
    return out.getvalue()


__all__ = ["MAX_BYTES", "MAX_SLICES", "PreviewData", "PreviewError", "choose_slices",
           "render_preview"]  # fmt: skip
