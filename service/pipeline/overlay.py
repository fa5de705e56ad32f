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
    """The result and the research notice burned into a copy of ``image``: the result at the
    top, the notice at the bottom (in yellow), sized to the image width."""
    out = np.ascontiguousarray(image.copy())
    height, width = out.shape[:2]
    lines, alerts = banner.lines(), banner.alerts()
    scale = _fit_scale([*lines, *alerts, RESEARCH_BANNER], width, max(0.35, width / 700.0))
    below = _draw_lines(out, lines, 0, scale, _WHITE)
    if alerts:
        _draw_lines(out, alerts, below, scale, _ORANGE)
    _, step = _line_step(scale)
    _draw_lines(out, [RESEARCH_BANNER], max(0, height - step - 2), scale, _YELLOW)
    return out


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
