"""The one preprocessing shared by training and serving (numpy only, no torch).

A volume arrives as a 3D array plus the affine that maps its (axis0, axis1, axis2) voxel indices
to patient LPS millimetres (DICOM's patient coordinate system). Preprocessing:

1. reorients it, by axis permutation and flips only (no resampling), to the canonical axial
   orientation ``"SPL"``: axis 0 runs inferior→superior (slices), axis 1 anterior→posterior
   (image rows, top of the image is anterior), axis 2 right→left (image columns, the patient's
   right on the image's left: the radiological convention of an axial DICOM slice);
2. scales intensities to [0, 1] by min–max, optionally between robust percentiles;
3. resizes to ``target_shape`` (H, W, S) by area interpolation (each output voxel is the
   overlap-weighted mean of the input voxels it covers).

The parameters are a :class:`~service.core.contract.PreprocessingConfig` (part of the ONNX
contract, re-exported here), written into the ONNX metadata as JSON by the export and read back
from there by the service, so both sides always run the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# the parameters are part of the ONNX contract; re-exported for the callers that preprocess
from service.core.contract import CANONICAL_ORIENTATION, PreprocessingConfig

__all__ = ["CANONICAL_ORIENTATION", "CanonicalVolume", "PreparedVolume", "PreprocessingConfig",
           "area_matrix", "canonical_to_source_axis", "linear_matrix", "preprocess",
           "reorient_to_canonical", "resize_area", "resize_linear", "restore_to_source",
           "scale_intensity", "source_shape"]

# Unit vector in LPS of the direction each canonical axis increases towards.
_CANONICAL_DIRECTIONS = {"S": (2, 1.0), "P": (1, 1.0), "L": (0, 1.0)}

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CanonicalVolume:
    """A volume in canonical ``SPL`` order, and the affine that now maps its indices to LPS."""

    array: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    # For each canonical axis: which source axis it came from, and whether it was flipped.
    source_axes: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]


def reorient_to_canonical(array: npt.NDArray[Any], affine: npt.ArrayLike, *,
                          contiguous: bool = True) -> CanonicalVolume:
    """Permute and flip ``array`` so that its axes run S, P, L; oblique volumes go to the
    nearest canonical axes (no resampling, so no interpolation blur of the source data).
    ``contiguous=False`` leaves ``array`` a (permuted, flipped) view of the input, not a copy."""
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0, keepdims=True)
    source_axes: list[int] = []
    flipped: list[bool] = []
    for letter in CANONICAL_ORIENTATION:
        lps_row, sign = _CANONICAL_DIRECTIONS[letter]
        weights = np.abs(directions[lps_row]).copy()
        weights[source_axes] = -1.0  # each source axis is used once
        axis = int(np.argmax(weights))
        source_axes.append(axis)
        flipped.append(bool(np.sign(directions[lps_row, axis]) != sign))
    if sorted(source_axes) != [0, 1, 2]:
        raise ValueError("affine does not span three independent axes")

    out = np.transpose(array, source_axes)
    new_affine = affine[:, [*source_axes, 3]].copy()
    for axis, flip in enumerate(flipped):
        if flip:
            out = np.flip(out, axis=axis)
            # index i becomes n-1-i: origin moves to the far end, direction reverses
            new_affine[:3, 3] += new_affine[:3, axis] * (array.shape[source_axes[axis]] - 1)
            new_affine[:3, axis] *= -1.0
    return CanonicalVolume(
        array=np.ascontiguousarray(out) if contiguous else out,
        affine=new_affine,
        source_axes=(source_axes[0], source_axes[1], source_axes[2]),
        flipped=(flipped[0], flipped[1], flipped[2]),
    )


def scale_intensity(array: npt.NDArray[Any], config: PreprocessingConfig) -> FloatArray:
    """Min–max to [0, 1] (between percentiles when configured), clipped; a flat volume → 0."""
    data = np.asarray(array, dtype=np.float32)
    low_pct, high_pct = config.intensity.get("percentiles", [0.0, 100.0])
    if low_pct == 0.0 and high_pct == 100.0:
        low, high = float(data.min()), float(data.max())
    else:
        low, high = (float(v) for v in np.percentile(data, [low_pct, high_pct]))
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("volume contains non-finite intensities")
    if high <= low:
        return np.zeros_like(data, dtype=np.float32)
    scaled = (data - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def area_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """(n_out, n_in) weights: output cell i is the overlap-weighted mean of the input cells
    covering [i*n_in/n_out, (i+1)*n_in/n_out). Each row sums to one."""
    if n_in < 1 or n_out < 1:
        raise ValueError("sizes must be positive")
    edges_out = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    starts, ends = edges_out[:-1, None], edges_out[1:, None]
    cells = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(ends, cells + 1.0) - np.maximum(starts, cells), 0.0, None)
    weights: npt.NDArray[np.float64] = overlap / overlap.sum(axis=1, keepdims=True)
    return weights


def resize_area(array: npt.NDArray[Any], shape: tuple[int, int, int]) -> FloatArray:
    """Separable area interpolation of a 3D array to ``shape``."""
    out = np.asarray(array, dtype=np.float32)
    for axis, size in enumerate(shape):
        if out.shape[axis] == size:
            continue
        weights = area_matrix(out.shape[axis], size).astype(np.float32)
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class PreparedVolume:
    """The model input for one volume and how it relates to the canonical source volume."""

    model_input: FloatArray  # (S, H, W) in [0, 1]
    canonical: CanonicalVolume

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        s, h, w = self.canonical.array.shape
        return s, h, w


def preprocess(
    array: npt.NDArray[Any], affine: npt.ArrayLike, config: PreprocessingConfig
) -> PreparedVolume:
    """Reorient, scale and resize one volume; ``model_input`` has shape ``config.model_grid``.
    ``canonical.array`` is a view of ``array``: a copy would cost 4 bytes a voxel of an
    analysis' peak memory for as long as the overlays need the geometry (the values are the
    same; the scaling below copies anyway)."""
    canonical = reorient_to_canonical(array, affine, contiguous=False)
    scaled = scale_intensity(canonical.array, config)
    return PreparedVolume(model_input=resize_area(scaled, config.model_grid), canonical=canonical)


# --------------------------------------------------------------------------------------------
# Back from the model grid: what overlays need (the inverse direction of ``preprocess``)
# --------------------------------------------------------------------------------------------


def linear_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """(n_out, n_in) weights of linear interpolation between cell centres, with the half-pixel
    convention of the area resize (cell i of n covers [i, i+1) in units of n_in/n) and edges
    clamped, as OpenCV's INTER_LINEAR and torch's ``align_corners=False``. Each row sums to one."""
    if n_in < 1 or n_out < 1:
        raise ValueError("sizes must be positive")
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    centres = np.clip(centres, 0.0, n_in - 1.0)
    low = np.floor(centres).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    frac = centres - low
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    weights[rows, low] += 1.0 - frac
    weights[rows, high] += frac
    return weights


def resize_linear(array: npt.NDArray[Any], shape: tuple[int, int, int]) -> FloatArray:
    """Separable linear interpolation of a 3D array to ``shape``. For smooth maps (Grad-CAM,
    attention) going up to a finer grid, where area interpolation would leave blocks; the
    cell centres line up with those of :func:`resize_area`, so either direction keeps
    every cell where the other one put it."""
    out = np.asarray(array, dtype=np.float32)
    if out.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {out.shape}")
    for axis, size in enumerate(shape):
        if out.shape[axis] == size:
            continue
        weights = linear_matrix(out.shape[axis], size).astype(np.float32)
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def source_shape(canonical: CanonicalVolume) -> tuple[int, int, int]:
    """The shape of the source array that ``canonical`` was made from."""
    shape = [0, 0, 0]
    for axis, source_axis in enumerate(canonical.source_axes):
        shape[source_axis] = canonical.array.shape[axis]
    return shape[0], shape[1], shape[2]


def restore_to_source(array: npt.NDArray[Any], canonical: CanonicalVolume) -> npt.NDArray[Any]:
    """The inverse of :func:`reorient_to_canonical`: ``array`` lies on the canonical grid of
    ``canonical`` (same shape as ``canonical.array``); the result lies on the source grid,
    voxel for voxel where the source volume was (undo the flips, then the permutation)."""
    if array.shape != canonical.array.shape:
        raise ValueError(f"array shape {array.shape} is not the canonical shape "
                         f"{canonical.array.shape}")
    out = array
    for axis, flip in enumerate(canonical.flipped):
        if flip:
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(np.transpose(out, np.argsort(canonical.source_axes)))


def canonical_to_source_axis(canonical: CanonicalVolume, source_axis: int) -> tuple[int, bool]:
    """Which canonical axis source axis ``source_axis`` became, and whether it was flipped."""
    axis = canonical.source_axes.index(source_axis)
    return axis, canonical.flipped[axis]
