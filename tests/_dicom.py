"""Helpers for the DICOM tests: write datasets to bytes, compare volumes with NIfTI references."""

from __future__ import annotations

import io
from collections.abc import Iterable
from itertools import product
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from service.core.volume import SeriesVolume, nifti_layout

TOL_MM = 1e-3
TOL_RAD = 1e-4


def read_all(folder: Path) -> list[Dataset]:
    """Fresh datasets of every .dcm in ``folder`` (tests mutate them)."""
    return [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_all(datasets: Iterable[Dataset]) -> list[bytes]:
    return [encode(ds) for ds in datasets]


def canonical(data: npt.ArrayLike, affine_ras: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both sides of a comparison go through nibabel's closest-canonical (RAS+) reorientation:
    permutations and flips only, voxel values untouched."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), np.asarray(affine_ras)))
    return np.asarray(image.dataobj), np.asarray(image.affine)


def reference(path: Path, volume: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """A dcm2niix NIfTI in physical values (its scl_slope/scl_inter applied), optionally one
    volume of a 4D file, plus the scale slope dcm2niix stored (its intercept is 0 here)."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    if volume is not None:
        data = data[..., volume]
    slope, inter = image.dataobj.slope, image.dataobj.inter
    assert inter in (None, 0.0), "the comparisons below assume dcm2niix's intercept is 0"
    return data, np.asarray(image.affine), float(1.0 if slope is None else slope)


def ours(volume: SeriesVolume) -> tuple[np.ndarray, np.ndarray]:
    data, affine = nifti_layout(volume)
    return canonical(data.astype(np.float64), affine)


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    return np.array([[*c, 1.0] for c in product(*[(0, n - 1) for n in shape[:3]])]).T


def assert_same_geometry(mine: np.ndarray, ref: np.ndarray, shape: tuple[int, ...],
                         tol_mm: float = TOL_MM, tol_rad: float = TOL_RAD) -> dict[str, float]:
    """Voxel sizes within ``tol_mm``, axis directions within ``tol_rad``, and the two grids
    anchored at the same voxel (one corner within ``tol_mm``); elsewhere the corners may differ
    only by what those checked size and angle differences add up to across the grid.

    The last clause is for dcm2niix, not us: it takes the slice spacing from the first two
    slice positions in float32, so at the far end of a 96-slice stack its affine sits up to
    ~0.01 mm off the positions in the files; ours reproduces every slice's
    ImagePositionPatient (checked in test_volume)."""
    sizes_mine = np.linalg.norm(mine[:3, :3], axis=0)
    sizes_ref = np.linalg.norm(ref[:3, :3], axis=0)
    size_error = np.abs(sizes_mine - sizes_ref)
    assert size_error.max() <= tol_mm, f"voxel sizes {sizes_mine} vs {sizes_ref}"
    cosines = np.sum((mine[:3, :3] / sizes_mine) * (ref[:3, :3] / sizes_ref), axis=0)
    angles = np.arccos(np.clip(cosines, -1.0, 1.0))
    assert angles.max() <= tol_rad, f"axis angles {angles} rad"
    corners = _corners(shape)
    distances = np.linalg.norm((mine @ corners - ref @ corners)[:3], axis=0)
    assert distances.min() <= tol_mm, f"no common anchor: corner distances {distances}"
    extent = np.array(shape[:3], dtype=np.float64) - 1.0
    drift = float(np.sum(extent * (size_error + sizes_ref * angles)))
    assert distances.max() <= tol_mm + drift, f"corner distances {distances}, drift {drift}"
    return {"max_corner_mm": float(distances.max()), "min_corner_mm": float(distances.min()),
            "max_angle_rad": float(angles.max()), "max_size_mm": float(size_error.max())}


def assert_matches_reference(volume: SeriesVolume, ref_path: Path, time_point: int | None = None,
                             our_slope: float | None = None) -> dict[str, Any]:
    """The volume equals dcm2niix's NIfTI after both are made RAS+ canonical: same shape,
    values exact up to the rescale's float rounding, geometry as :func:`assert_same_geometry`.

    ``our_slope``: compare stored integers (value / slope, exactly) instead of physical values;
    for Philips, where dcm2niix applies the private precise scale (2005,100E) rather than the
    public RescaleSlope that we (and viewers) use, so only the stored integers are common."""
    mine, mine_affine = ours(volume)
    ref_data, ref_affine, ref_slope = reference(ref_path, time_point)
    ref_data, ref_affine = canonical(ref_data, ref_affine)
    assert mine.shape == ref_data.shape, f"shape {mine.shape} vs reference {ref_data.shape}"
    if our_slope is not None:
        stored_mine = np.rint(mine / our_slope)
        stored_ref = np.rint(ref_data / ref_slope)
        assert np.array_equal(stored_mine, stored_ref), "stored integers differ"
        difference = float(np.abs(stored_mine - stored_ref).max())
    else:
        scale = max(float(np.abs(ref_data).max()), 1.0)
        difference = float(np.abs(mine - ref_data).max())
        # float32 output vs dcm2niix's integer × float32 slope: a few ulps of the largest value
        assert difference <= 1e-6 * scale, f"max |Δ| {difference} (scale {scale})"
        # and exactly the same stored integers behind those physical values
        assert np.array_equal(np.rint(mine / ref_slope), np.rint(ref_data / ref_slope))
    geometry = assert_same_geometry(mine_affine, ref_affine, mine.shape)
    return {"max_abs_diff": difference, "ref_slope": ref_slope, **geometry}
