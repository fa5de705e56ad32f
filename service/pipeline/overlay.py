"""An explanation map back on the source images: geometry, colour, banner, preview montage.

The map shown is the one ``FLAIRCAD_EXPLANATION`` chooses
(:data:`service.core.contract.EXPLANATIONS`:
HiResCAM by default, Grad-CAM, or the model's own attention); "CAM" below means that map. Every
banner names it (:func:`explanation_label`).

The model sees a canonical (SPL) volume resized to its grid; its maps come on a coarser
grid (one cell per feature-map position, 16×16 per 256×256 slice for the demo model). To show it
on the images the radiologist has, :func:`cam_to_source` interpolates the CAM linearly to the
canonical volume's shape (cell centres where the area resize of preprocessing put them, i.e.
the same geometry as "upsample to the model grid, then resize to the canonical shape") and undoes
the reorientation, so that ``cam[k]`` lies on source slice ``k`` pixel for pixel: same rows, same
columns, whatever the acquisition plane.

The CAM is normalised over the whole volume (divided by its volume maximum), never per slice:
a slice the model hardly used stays dark instead of being stretched to full colour.

Slice weights: the model weighs its own slices (``slice_weights``, on the canonical S axis)
and the positions within each slice (``spatial_attention``, summing to one per slice). Their
product is an attention mass over the model grid that sums to one; :func:`source_slice_weights`
gives the share of that mass that falls in each source slice (each model cell's mass spread over
the canonical voxels it covers, as the area resize took them). For an axial series this is the
model's slice weights resampled to the source slices; for a sagittal or coronal one, where
every source slice cuts through every model slice, the spatial attention decides.

Banner (:func:`burn_banner`, laid out by :func:`banner_layout`): the Secondary Capture keeps the
source geometry, so nothing is padded; the result and any alerts sit in a darkened strip at the
top edge, "RESEARCH USE ONLY - NOT FOR DIAGNOSIS" in one at the bottom edge, together at most
:data:`BANNER_MAX_ROWS` of the rows whatever the matrix (the font shrinks and the text wraps,
no line is cut), and a JET colour bar (1 at the top, 0 at the bottom, the map's name along it)
at the right edge, a few per cent of the width (:func:`colour_bar_box`). The rest of the image
is untouched.

Banner text is drawn with OpenCV's Hershey fonts, which are ASCII only: every string passes
:func:`service.pipeline.sanitize.clean_ascii` first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS, Explanation
from service.core.preprocess import (
    PreparedVolume,
    area_matrix,
    canonical_to_source_axis,
    resize_linear,
    restore_to_source,
)
from service.pipeline.sanitize import clean_ascii

RESEARCH_BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
OUTSIDE_DISTRIBUTION_BANNER = "OUTSIDE THE TRAINING DISTRIBUTION"
# The input matched no FLAIR rule and was analysed under FLAIRCAD_ACCEPT_NON_FLAIR
NOT_FLAIR_BANNER = "NOT RECOGNISED AS FLAIR: RESEARCH OVERRIDE"
# How banners, SeriesDescriptions and reports name each map of service.core.contract.EXPLANATIONS
EXPLANATION_LABELS: dict[str, str] = {
    Explanation.HIRESCAM.value: "HiResCAM",
    Explanation.GRADCAM.value: "Grad-CAM",
    Explanation.ATTENTION.value: "attention",
}
ALPHA_MAX = 0.5  # opacity of the colour map where the CAM is at its volume maximum
WINDOW_PERCENTILES = (1.0, 99.5)  # grey window of the source volume
PREVIEW_SLICES = 8
PREVIEW_TILE = 256
BANNER_MAX_ROWS = 0.10  # the text strips (top and bottom together) take at most this of the rows
STRIP_SHADE = 0.35  # the strips darken what is under them (it stays faintly visible)
COLOUR_BAR_ROWS = (0.25, 0.75)  # the colour bar spans these fractions of the rows…
COLOUR_BAR_WIDTH = 0.025  # …and this fraction of the columns, at the right edge
_MIN_SCALE = 0.1  # Hershey font scale below which the text search stops
_SCALE_STEP = 0.01
_CRISP_BELOW = 0.4  # font scale below which the text's ink coverage is boosted (see _ink)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_YELLOW = (255, 255, 0)
_ORANGE = (255, 140, 0)

FloatArray = npt.NDArray[np.float32]
RGBImage = npt.NDArray[np.uint8]


def explanation_label(name: str) -> str:
    """The name a reader sees for the map ``name`` ("HiResCAM", "Grad-CAM", "attention")."""
    if name not in EXPLANATIONS:
        raise ValueError(f"unknown explanation map {name!r}; one of {sorted(EXPLANATIONS)}")
    return EXPLANATION_LABELS.get(name, name)


@dataclass(frozen=True)
class Banner:
    """What every overlay says about the result: the map shown, the result, the model, and
    (when the input is unlike the training data) that warning."""

    prediction: str
    probabilities: Mapping[str, float]
    model_name: str
    model_version: str
    explanation: str = DEFAULT_EXPLANATION
    in_distribution: bool = True
    flair_recognised: bool = True

    def lines(self) -> list[str]:
        probabilities = "  ".join(
            f"P({clean_ascii(name, 16)})={p:.3f}" for name, p in self.probabilities.items()
        )
        return [
            f"flaircad {explanation_label(self.explanation)}: {clean_ascii(self.prediction, 32)}",
            probabilities,
            f"{clean_ascii(self.model_name, 40)} {clean_ascii(self.model_version, 40)}",
        ]

    def alerts(self) -> list[str]:
        """Warnings drawn under the result lines, in orange."""
        return ([] if self.flair_recognised else [NOT_FLAIR_BANNER]) + (
            [] if self.in_distribution else [OUTSIDE_DISTRIBUTION_BANNER])


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def cam_to_source(cam: npt.NDArray[np.floating], prepared: PreparedVolume) -> FloatArray:
    """One item's map ``(S, h, w)`` on the source grid ``(slices, rows, columns)``;
    negative values (none after the CAMs' ReLU or in attention, but a model may differ) become
    0."""
    if cam.ndim != 3:
        raise ValueError(f"expected a (S, h, w) CAM, got shape {cam.shape}")
    positive = np.maximum(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0)
    on_canonical = resize_linear(positive, prepared.canonical_shape)
    return restore_to_source(on_canonical, prepared.canonical)


def normalise_volume(cam: FloatArray, *, in_place: bool = False) -> FloatArray:
    """Divide by the volume maximum (all zeros stays all zeros). ``in_place`` reuses a
    float32 ``cam``'s buffer: the map is as large as the source volume (4 bytes a voxel),
    and each temporary copy of it counts in an analysis' peak memory."""
    peak = float(cam.max()) if cam.size else 0.0
    if not math.isfinite(peak) or peak <= 0.0:
        return np.zeros_like(cam, dtype=np.float32)
    reuse = in_place and cam.dtype == np.float32 and cam.flags.writeable
    out = np.divide(cam, np.float32(peak), out=cam if reuse else None)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def source_slice_weights(slice_weights: npt.NDArray[np.floating],
                         spatial_attention: npt.NDArray[np.floating],
                         prepared: PreparedVolume) -> npt.NDArray[np.float64]:
    """Per source slice (source array axis 0, in array order): the share of the model's
    attention mass (slice weight × spatial attention) that lies in it. Sums to one."""
    weights = np.nan_to_num(np.asarray(slice_weights, dtype=np.float64)).clip(min=0.0)
    attention = np.nan_to_num(np.asarray(spatial_attention, dtype=np.float64)).clip(min=0.0)
    if weights.ndim != 1 or attention.ndim != 3 or attention.shape[0] != weights.shape[0]:
        raise ValueError(f"slice weights {weights.shape} and spatial attention "
                         f"{attention.shape} do not match")
    per_slice = attention.sum(axis=(1, 2), keepdims=True)
    # a slice without attention spreads its weight evenly over its positions
    attention = np.where(per_slice > 0, attention / np.where(per_slice > 0, per_slice, 1.0),
                         1.0 / (attention.shape[1] * attention.shape[2]))
    mass = weights[:, None, None] * attention
    axis, flipped = canonical_to_source_axis(prepared.canonical, 0)
    marginal = mass.sum(axis=tuple(a for a in range(3) if a != axis))
    n_canonical = prepared.canonical_shape[axis]
    # model cell i covers canonical voxels [i n/N, (i+1) n/N): spread its mass over them
    spread = area_matrix(n_canonical, marginal.shape[0]).T @ marginal
    if flipped:
        spread = spread[::-1]
    total = spread.sum()
    if not math.isfinite(total) or total <= 0.0:
        return np.full(n_canonical, 1.0 / n_canonical)
    return np.ascontiguousarray(spread / total)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def window(volume: npt.NDArray[np.floating],
           percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> npt.NDArray[np.uint8]:
    """The volume as 8-bit grey, one window for every slice (robust percentiles)."""
    data = np.asarray(volume)
    # a regular subsample estimates the percentiles as well and keeps big volumes cheap
    sample = np.nan_to_num(np.asarray(data.flat[:: max(1, data.size // 200_000)],
                                      dtype=np.float32))
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if high <= low:
        high = low + 1.0
    # In place, and rounding as +0.5 then truncation (valid once clipped to ≥ 0): a 200-slice
    # volume is millions of voxels, and each temporary array costs as much as the arithmetic.
    # Slice by slice (the same element-wise arithmetic): a float copy of the whole volume
    # would cost 4 bytes a voxel of an analysis' peak memory, the grey result costs 1.
    gain = np.float32(255.0 / (high - low))
    offset = np.float32(low) * gain - np.float32(0.5)
    chunks = data if data.ndim >= 2 else data.reshape(1, -1)
    grey = np.empty(chunks.shape, dtype=np.uint8)
    for k in range(chunks.shape[0]):
        scaled = np.nan_to_num(np.array(chunks[k], dtype=np.float32), copy=False)
        scaled *= gain
        scaled -= offset
        np.clip(scaled, 0.0, 255.0, out=scaled)
        grey[k] = scaled
    return grey.reshape(data.shape)


def blend(grey: npt.NDArray[np.uint8], cam: FloatArray, alpha_max: float = ALPHA_MAX) -> RGBImage:
    """JET colour map of ``cam`` (in [0, 1]) over the grey image; the opacity follows the CAM,
    so where the model did not look the image stays grey."""
    colour = cv2.applyColorMap(np.clip(cam * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    alpha = np.ascontiguousarray(np.clip(cam, 0.0, 1.0) * alpha_max, dtype=np.float32)
    out = cv2.blendLinear(base, colour, 1.0 - alpha, alpha)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _fit_scale(lines: Sequence[str], width: int, max_scale: float) -> float:
    widest = max(cv2.getTextSize(line, _FONT, 1.0, 1)[0][0] for line in lines if line)
    return max(0.2, min(max_scale, 0.94 * width / max(widest, 1)))


def _line_step(scale: float) -> tuple[int, int]:
    """Text height and line pitch in pixels at ``scale``."""
    height = int(cv2.getTextSize("Ag", _FONT, scale, 1)[0][1])
    return height, math.ceil(height * 1.7) + 1


def _draw_lines(image: RGBImage, lines: Sequence[str], top: int, scale: float,
                colour: tuple[int, int, int]) -> int:
    """Draw ``lines`` from row ``top`` on a darkened strip; returns the row below the strip."""
    height, step = _line_step(scale)
    bottom = min(int(image.shape[0]), top + step * len(lines) + 2)
    strip = image[top:bottom]
    strip[:] = (strip.astype(np.float32) * 0.3).astype(np.uint8)
    margin = max(2, image.shape[1] // 100)
    for i, line in enumerate(lines):
        baseline = top + step * (i + 1) - max(1, step - height) // 2
        cv2.putText(image, line, (margin, baseline), _FONT, scale, colour, 1, cv2.LINE_AA)
    return bottom


def burn_banner(image: RGBImage, banner: Banner) -> RGBImage:
    """The result, the research notice and a colour bar burned into a copy of ``image``
    (:func:`banner_layout` says where): the result and any alerts in a strip at the top, the
    notice at the bottom, the JET legend at the right edge; the rest of the image is left
    as it was."""
    out = np.ascontiguousarray(image.copy())
    layout = banner_layout(banner, int(out.shape[0]), int(out.shape[1]))
    for block in layout.blocks:
        box = block.box
        _darken(out, box)
        for line in block.lines:
            mask = np.zeros((box.bottom - box.top, box.right - box.left), dtype=np.uint8)
            x, y = line.origin
            cv2.putText(mask, line.text, (x - box.left, y - box.top), _FONT, layout.scale, 255,
                        1, cv2.LINE_AA)
            _ink(out, box, mask, line.colour, layout.scale)
    _draw_colour_bar(out, layout)
    return out


# --------------------------------------------------------------------------------------------
# Banner layout: small strips at the top and bottom edges, a colour bar at the right edge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Pixel rectangle ``[top, bottom) × [left, right)``."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def area(self) -> int:
        return max(0, self.bottom - self.top) * max(0, self.right - self.left)


@dataclass(frozen=True)
class PlacedLine:
    text: str
    origin: tuple[int, int]  # (column, baseline row) for cv2.putText
    width: int  # pixels at the layout's scale
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class TextBlock:
    box: Box  # the darkened strip behind the lines
    lines: tuple[PlacedLine, ...]


@dataclass(frozen=True)
class BannerLayout:
    """Where :func:`burn_banner` puts everything on a ``rows`` × ``columns`` image."""

    rows: int
    columns: int
    scale: float  # Hershey font scale of every line
    blocks: tuple[TextBlock, ...]  # the top strip (result, alerts), the bottom strip (notice)
    bar: Box  # the colour bar: JET(1) in its top row down to JET(0) in its bottom row
    explanation: str  # the map's name, written along the bar

    def lines(self) -> list[str]:
        return [line.text for block in self.blocks for line in block.lines]

    def strip_rows(self) -> int:
        return sum(block.box.bottom - block.box.top for block in self.blocks)


def colour_bar_box(rows: int, columns: int) -> Box:
    """The colour bar's pixels on a ``rows`` × ``columns`` overlay: a few per cent of the
    width at the right edge (in axial slices the head's narrow side: air there), the middle
    half of the height."""
    width = max(3, round(COLOUR_BAR_WIDTH * columns))
    right = columns - max(2, round(0.015 * columns))
    top, bottom = (round(f * rows) for f in COLOUR_BAR_ROWS)
    return Box(top, max(top + 2, bottom), max(0, right - width), right)


def _pitch(scale: float) -> tuple[int, int, int]:
    """Cap height, descent and line pitch in pixels at ``scale`` (parentheses and descenders
    inside the pitch: no line is cut by the next one or by the strip's edge)."""
    (_, height), descent = cv2.getTextSize("(Agy|", _FONT, scale, 1)
    pad = max(1, round(0.25 * height))
    return int(height), int(descent), int(height + descent + pad)


def _text_width(text: str, scale: float) -> int:
    return int(cv2.getTextSize(text, _FONT, scale, 1)[0][0])


def _place(lines: Sequence[str], colours: Sequence[tuple[int, int, int]], top: int,
           scale: float, margin: int, columns: int) -> TextBlock:
    height, descent, pitch = _pitch(scale)
    lead = (pitch - height - descent + 1) // 2  # the padding split above and below
    placed = tuple(
        PlacedLine(text, (margin, top + i * pitch + lead + height), _text_width(text, scale),
                   colour)
        for i, (text, colour) in enumerate(zip(lines, colours, strict=True)))
    right = min(columns, max(line.width for line in placed) + 2 * margin)
    return TextBlock(Box(top, top + pitch * len(placed), 0, right), placed)


@dataclass(frozen=True)
class _Group:
    """Text of one colour, as the parts a line may break between (``joiner`` between two on
    one line); an ``atomic`` part is never broken, any other is broken at spaces when it is
    wider than a line on its own."""

    parts: tuple[str, ...]
    joiner: str
    colour: tuple[int, int, int]
    atomic: bool = False


def _words(part: str, width: int, scale: float) -> list[str] | None:
    """``part`` greedily broken at spaces into lines of at most ``width`` pixels; None when a
    word alone is wider."""
    lines: list[str] = []
    for word in part.split():
        if lines and _text_width(f"{lines[-1]} {word}", scale) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        elif _text_width(word, scale) <= width:
            lines.append(word)
        else:
            return None
    return lines


def _wrap(group: _Group, width: int, scale: float) -> list[str] | None:
    """The fewest lines of at most ``width`` pixels holding ``group`` in order (greedy), or
    None when something in it cannot fit at ``scale``."""
    lines: list[str] = []
    for part in group.parts:
        joined = f"{lines[-1]}{group.joiner}{part}" if lines else part
        if lines and _text_width(joined, scale) <= width:
            lines[-1] = joined
        elif _text_width(part, scale) <= width:
            lines.append(part)
        elif group.atomic:
            return None
        else:
            broken = _words(part, width, scale)
            if broken is None:
                return None
            lines.extend(broken)
    return lines


def _fit(groups: Sequence[_Group], width: int, budget: int,
         scale: float) -> list[list[str]] | None:
    """Every group wrapped at ``scale``, when all their lines fit ``budget`` rows."""
    wrapped = [_wrap(group, width, scale) for group in groups]
    if any(lines is None for lines in wrapped):
        return None
    done = [lines for lines in wrapped if lines is not None]
    return done if sum(map(len, done)) * _pitch(scale)[2] <= budget else None


def _banner_groups(banner: Banner) -> tuple[list[_Group], _Group]:
    """The top strip's groups (the result in white, the alerts in orange) and the bottom
    strip's (the research notice in yellow, "RESEARCH USE ONLY" never broken)."""
    white = _Group(tuple(part for line in banner.lines() for part in line.split("  ") if part),
                   "  ", _WHITE)
    top = [white]
    if banner.alerts():
        top.append(_Group(tuple(banner.alerts()), ";  ", _ORANGE))
    notice, _, rest = RESEARCH_BANNER.partition(" - ")
    bottom = _Group((notice, f"- {rest}") if rest else (notice,), " ", _YELLOW, atomic=True)
    return top, bottom


def banner_layout(banner: Banner, rows: int, columns: int) -> BannerLayout:
    """The banner on a ``rows`` × ``columns`` image. The text strips together take at most
    :data:`BANNER_MAX_ROWS` of the rows whatever the matrix: the largest font at which the
    result, the alerts and the notice, wrapped into as few lines as that font allows, fit the
    width and that height, every line whole (smaller text on a small matrix, never a cut
    line or a band over the anatomy)."""
    margin = max(2, columns // 100)
    width = max(1, columns - 2 * margin)
    budget = max(1, math.floor(BANNER_MAX_ROWS * rows))
    top_groups, bottom_group = _banner_groups(banner)
    groups = [*top_groups, bottom_group]
    scale = max(0.35, columns / 700.0)
    wrapped = _fit(groups, width, budget, scale)
    while wrapped is None and scale > _MIN_SCALE:
        scale = round(scale - _SCALE_STEP, 2)
        wrapped = _fit(groups, width, budget, scale)
    if wrapped is None:  # a tiny image: the smallest font, one unbroken line per part
        wrapped = [list(group.parts) for group in groups]
    *top_lines, bottom_lines = wrapped
    texts = [line for lines in top_lines for line in lines]
    colours = [group.colour for group, lines in zip(top_groups, top_lines, strict=True)
               for _ in lines]
    pitch = _pitch(scale)[2]
    top = _place(texts, colours, 0, scale, margin, columns)
    bottom = _place(bottom_lines, [bottom_group.colour] * len(bottom_lines),
                    max(0, rows - pitch * len(bottom_lines)), scale, margin, columns)
    return BannerLayout(rows, columns, scale, (top, bottom), colour_bar_box(rows, columns),
                        explanation_label(banner.explanation))


def jet_colours(values: npt.NDArray[np.floating]) -> RGBImage:
    """RGB of the JET colour map at ``values`` in [0, 1]: the same lookup :func:`blend`
    colours the map with."""
    index = np.clip(np.asarray(values, dtype=np.float64) * 255.0, 0, 255).astype(np.uint8)
    bgr = np.asarray(cv2.applyColorMap(index.reshape(-1, 1), cv2.COLORMAP_JET), dtype=np.uint8)
    return np.ascontiguousarray(bgr[:, 0, ::-1]).reshape(*index.shape, 3)


def _darken(image: RGBImage, box: Box) -> None:
    region = image[box.top:box.bottom, box.left:box.right]
    region[:] = (region.astype(np.float32) * STRIP_SHADE).astype(np.uint8)


def _label(image: RGBImage, text: str, box: Box, scale: float, *, rotate: bool) -> None:
    """``text`` in white on a darkened ``box`` (written bottom to top when ``rotate``)."""
    box = Box(max(0, box.top), min(image.shape[0], box.bottom), max(0, box.left),
              min(image.shape[1], box.right))
    if box.area == 0:
        return
    height = _pitch(scale)[0]
    across, along = (box.right - box.left, box.bottom - box.top)
    mask = np.zeros((across, along) if rotate else (along, across), dtype=np.uint8)
    baseline = (mask.shape[0] + height) // 2
    cv2.putText(mask, text, (1, baseline), _FONT, scale, 255, 1, cv2.LINE_AA)
    if rotate:
        mask = np.asarray(cv2.rotate(mask, cv2.ROTATE_90_COUNTERCLOCKWISE), dtype=np.uint8)
    _darken(image, box)
    _ink(image, box, mask, _WHITE, scale)


def _ink(image: RGBImage, box: Box, mask: npt.NDArray[np.uint8],
         colour: tuple[int, int, int], scale: float) -> None:
    """``colour`` laid into ``box`` where the text ``mask`` (0-255 coverage) has ink. Small
    text's strokes are thinner than a pixel, and OpenCV (5.x) anti-aliases every stroke: their
    coverage is boosted so that the orange alert and the yellow notice keep their colour."""
    gain = 1.0 if scale >= _CRISP_BELOW else 2.0
    alpha = np.clip(mask.astype(np.float32) * np.float32(gain / 255.0), 0.0, 1.0)[..., None]
    region = image[box.top:box.bottom, box.left:box.right].astype(np.float32)
    paint = np.asarray(colour, dtype=np.float32)
    image[box.top:box.bottom, box.left:box.right] = (
        region * (1.0 - alpha) + paint * alpha).astype(np.uint8)


def _draw_colour_bar(image: RGBImage, layout: BannerLayout) -> None:
    """The legend: JET from 1 (top) to 0 (bottom), "1" above it, "0" under it, the map's
    name along its left side. Opaque: it shows the colour map itself (the overlay blends it
    at up to :data:`ALPHA_MAX`)."""
    bar = layout.bar
    length = bar.bottom - bar.top
    values = 1.0 - np.arange(length, dtype=np.float64) / max(1, length - 1)
    image[bar.top:bar.bottom, bar.left:bar.right] = jet_colours(values)[:, None, :]
    scale = layout.scale
    pitch = _pitch(scale)[2]
    for text, top in (("1", bar.top - pitch), ("0", bar.bottom)):
        width = _text_width(text, scale) + 2
        _label(image, text, Box(top, top + pitch, bar.right - width, bar.right), scale,
               rotate=False)
    # the map's name written along the bar, shrunk until it fits the bar's length
    name_scale = scale
    while name_scale > _MIN_SCALE and _text_width(layout.explanation, name_scale) + 2 > length:
        name_scale = round(name_scale - _SCALE_STEP, 2)
    name_pitch = _pitch(name_scale)[2]
    name_length = min(length, _text_width(layout.explanation, name_scale) + 2)
    middle = (bar.top + bar.bottom) // 2
    left = bar.left - 1 - name_pitch
    _label(image, layout.explanation,
           Box(middle - name_length // 2, middle - name_length // 2 + name_length, left,
               bar.left - 1), name_scale, rotate=True)


# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------


def _tile(image: RGBImage, pixel_spacing: tuple[float, float], size: int) -> RGBImage:
    """``image`` fitted into a ``size``×``size`` black square at its physical aspect ratio."""
    rows, cols = image.shape[:2]
    height_mm, width_mm = rows * pixel_spacing[0], cols * pixel_spacing[1]
    scale = size / max(height_mm, width_mm)
    new_h = max(1, min(size, round(height_mm * scale)))
    new_w = max(1, min(size, round(width_mm * scale)))
    shrink = new_h < rows or new_w < cols
    resized = cv2.resize(image, (new_w, new_h),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    tile = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    tile[top:top + new_h, left:left + new_w] = resized
    return tile


def most_attended(weights: Sequence[float], count: int = PREVIEW_SLICES) -> list[int]:
    """Indices of the ``count`` largest weights (ties: the earlier index)."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    return order[:count]


def preview_png(images: Sequence[RGBImage] | Mapping[int, RGBImage], chosen: Sequence[int],
                captions: Sequence[str],
                banner: Banner, pixel_spacing: tuple[float, float],
                tile: int = PREVIEW_TILE) -> bytes:
    """A PNG montage of ``images[i]`` for ``i`` in ``chosen`` (in that order), each captioned,
    under a header with the result and the research notice."""
    if not chosen:
        raise ValueError("nothing to show")
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    caption_height = 22
    lines, alerts = banner.lines(), banner.alerts()
    header_lines = [*lines, *alerts, RESEARCH_BANNER]
    header_scale = _fit_scale(header_lines, columns * tile, 0.6)
    _, step = _line_step(header_scale)
    header_height = step * len(header_lines) + 4
    canvas = np.zeros((header_height + rows * (tile + caption_height), columns * tile, 3),
                      dtype=np.uint8)
    _draw_lines(canvas, lines, 0, header_scale, _WHITE)
    if alerts:
        _draw_lines(canvas, alerts, step * len(lines), header_scale, _ORANGE)
    _draw_lines(canvas, [RESEARCH_BANNER], step * (len(header_lines) - 1), header_scale,
                _YELLOW)
    for n, index in enumerate(chosen):
        row, column = divmod(n, columns)
        top = header_height + row * (tile + caption_height)
        left = column * tile
        canvas[top:top + tile, left:left + tile] = _tile(images[index], pixel_spacing, tile)
        cv2.putText(canvas, clean_ascii(captions[n], 40), (left + 4, top + tile + 16), _FONT,
                    0.45, (255, 255, 255), 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview PNG")
    return encoded.tobytes()


# --------------------------------------------------------------------------------------------
# Everything for one analysis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """Per source slice, in source array order (axis 0 of the volume)."""

    overlays: list[RGBImage]  # with the burned-in banner: the Secondary Capture pixels
    cam: FloatArray  # (slices, rows, columns) in [0, 1], normalised over the volume
    slice_weights: npt.NDArray[np.float64]  # sums to one
    preview_png: bytes


def render(volume: npt.NDArray[np.floating], prepared: PreparedVolume,
           explanation: npt.NDArray[np.floating], slice_weights: npt.NDArray[np.floating],
           spatial_attention: npt.NDArray[np.floating], banner: Banner, *,
           display_order: Sequence[int], slice_labels: Sequence[str],
           pixel_spacing: tuple[float, float]) -> Rendered:
    """Overlays for every source slice and the preview of the most attended ones.
    ``volume`` is the source array (slices, rows, columns); ``explanation`` (the map shown,
    ``banner.explanation`` names it), ``slice_weights`` and ``spatial_attention`` one item of
    the engine output; ``display_order`` lists source slice indices in reading order
    (InstanceNumber) and ``slice_labels[k]`` names slice ``k`` in the preview. The preview picks
    its slices by the model's attention, whichever map is shown."""
    cam = normalise_volume(cam_to_source(explanation, prepared), in_place=True)
    if cam.shape != volume.shape:
        raise ValueError(f"CAM mapped to {cam.shape}, source volume is {volume.shape}")
    weights = source_slice_weights(slice_weights, spatial_attention, prepared)
    grey = window(volume)
    chosen = set(most_attended(list(weights)))
    # One overlay at a time: only the preview's few slices keep their banner-less image
    # (all of them would cost another 3 bytes a voxel of an analysis' peak memory).
    plain: dict[int, RGBImage] = {}
    overlays: list[RGBImage] = []
    for k in range(volume.shape[0]):
        image = blend(grey[k], cam[k])
        overlays.append(burn_banner(image, banner))
        if k in chosen:
            plain[k] = image
    del grey
    shown = [k for k in display_order if k in chosen]
    captions = [f"{slice_labels[k]}  w={weights[k]:.3f}" for k in shown]
    png = preview_png(plain, shown, captions, banner, pixel_spacing)
    return Rendered(overlays=overlays, cam=cam, slice_weights=weights, preview_png=png)
