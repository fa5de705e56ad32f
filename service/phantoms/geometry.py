"""Acquisition geometry: the grids a phantom is sampled on, and what one series is (numpy only).

The variants are a 2D axial slab (:func:`generate_phantom`, canonical SPL order), a 3D sagittal
slab and an oblique (tilted) axial slab. Every grid is rounded to what its DICOM decimal strings
hold (:func:`_ds`, :func:`_exact`), so the headers describe the rendered grid exactly. A
:class:`_Plan` is one series (anatomy with its shift, grid, and the parts its UIDs derive from);
:class:`SeriesTruth` is its lesion and brain masks on that grid, file by file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.uid import UID, generate_uid

from service.phantoms.anatomy import (
    Anatomy,
    BoolArray,
    F64Array,
    FloatArray,
    _check_label,
    _rotation,
)
from service.phantoms.lesions import make_anatomy
from service.phantoms.rendering import _render
from service.phantoms.shift import _NO_SHIFT, Shift

VARIANTS: tuple[str, ...] = ("axial", "sagittal", "oblique")


@dataclass(frozen=True)
class PhantomVolume:
    """A phantom sampled on an axial grid, in the canonical SPL order of service.core.preprocess."""

    volume: FloatArray  # (S, H, W): inferior->superior, anterior->posterior, right->left
    lesion_mask: BoolArray  # True in hyperintense lesions and in lacunes including their rim
    label: str
    affine: F64Array  # 4x4: (axis0, axis1, axis2) voxel index -> LPS mm
    seed: int
    # LESION_SITES index of every lesion voxel (0 elsewhere): the descriptor map a reader's
    # annotation would give, used only to pretrain the backbone (model_export.pretrain)
    lesion_sites: npt.NDArray[np.int8] | None = None
    # intracranial brain (cerebrum, cerebellum, brainstem, with the ventricles and sulcal CSF
    # inside the brain's surface; not the coverings, the scalp, the neck or air)
    brain_mask: BoolArray | None = None


@dataclass(frozen=True)
class _Geometry:
    """One series' grid in DICOM terms; ``points`` is exactly what its headers say."""

    positions: F64Array  # (S, 3) ImagePositionPatient per slice
    row_dir: F64Array  # first IOP triplet: direction of increasing column index
    col_dir: F64Array  # second IOP triplet: direction of increasing row index
    pixel: float  # both PixelSpacing values
    rows: int
    cols: int
    thickness: float
    spacing: float

    def points(self) -> F64Array:
        c = np.arange(self.cols, dtype=np.float64)[:, None] * (self.pixel * self.row_dir)
        r = np.arange(self.rows, dtype=np.float64)[:, None] * (self.pixel * self.col_dir)
        return self.positions[:, None, None, :] + r[None, :, None, :] + c[None, None, :, :]

    @property
    def normal(self) -> F64Array:
        return np.cross(self.row_dir, self.col_dir)


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) with no more precision than it can carry."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def _exact(values: Any) -> F64Array:
    """Round geometry to what its DS strings hold, so files and renderings agree exactly."""
    return np.array([float(_ds(float(v))) for v in np.ravel(values)]).reshape(np.shape(values))


def _slab(centre: F64Array, row_dir: F64Array, col_dir: F64Array, slices: int, rows: int,
          cols: int, pixel: float, spacing: float, thickness: float) -> _Geometry:
    row_dir, col_dir = _exact(row_dir), _exact(col_dir)
    normal = np.cross(row_dir, col_dir)
    offsets = (np.arange(slices) - (slices - 1) / 2.0) * spacing
    corner = centre - (cols - 1) / 2.0 * pixel * row_dir - (rows - 1) / 2.0 * pixel * col_dir
    positions = _exact(corner[None, :] + offsets[:, None] * normal[None, :])
    return _Geometry(positions, row_dir, col_dir, pixel, rows, cols, thickness, spacing)


def _axial_geometry(anatomy: Anatomy, slices: int, matrix: int, thickness: float,
                    pixel: float) -> _Geometry:
    """Field of view centred on the scanner isocentre in-plane, slab centred on the brain.
    Pixel size and thickness are taken as their DS strings write them (0.9375 mm is exact;
    230/288 mm becomes 0.798611), so the headers describe the rendered grid exactly."""
    if slices < 1 or matrix < 1 or thickness <= 0 or pixel <= 0:
        raise ValueError("slices, matrix, slice thickness and pixel size must be positive")
    pixel, thickness = float(_ds(float(pixel))), float(_ds(float(thickness)))
    if pixel <= 0 or thickness <= 0:
        raise ValueError("pixel size and slice thickness must be at least 1e-6 mm")
    centre = np.array([0.0, 0.0, round(float(anatomy.brain_centre_lps()[2]), 1)])
    return _slab(centre, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), slices, matrix,
                 matrix, pixel, thickness, thickness)


def _noise_rng(label: str, seed: int, variant: str) -> np.random.Generator:
    return np.random.default_rng([seed, 3, _check_label(label), VARIANTS.index(variant)])


_AXIAL_GRID: dict[str, float] = {"matrix": 256, "pixel_mm": 0.9375, "slice_thickness_mm": 5.0}


def generate_phantom(
    label: str,
    seed: int,
    *,
    slices: int = 24,
    matrix: int = 256,
    slice_thickness_mm: float = 5.0,
    pixel_mm: float = 0.9375,
    shift: Shift | None = None,
) -> PhantomVolume:
    """An axial acquisition of the phantom (contiguous slices, slab centred on the brain), as
    the canonical SPL array training and the service both use; ``shift`` moves it off the
    training distribution (see :class:`Shift`)."""
    if slices < 1 or matrix < 1 or slice_thickness_mm <= 0 or pixel_mm <= 0:
        raise ValueError("slices, matrix, slice thickness and pixel size must be positive")
    anatomy = make_anatomy(label, seed, shift)
    geometry = _axial_geometry(anatomy, slices, matrix, slice_thickness_mm, pixel_mm)
    return _axial_phantom(anatomy, geometry)


def _axial_phantom(anatomy: Anatomy, geometry: _Geometry) -> PhantomVolume:
    label, seed = anatomy.label, anatomy.seed
    volume, mask, sites, brain = _render(anatomy, geometry.points(),
                                         _noise_rng(label, seed, "axial"), brain=True)
    affine = np.eye(4)
    affine[:3, 0] = geometry.normal * geometry.spacing
    affine[:3, 1] = geometry.col_dir * geometry.pixel
    affine[:3, 2] = geometry.row_dir * geometry.pixel
    affine[:3, 3] = geometry.positions[0]
    return PhantomVolume(volume=volume, lesion_mask=mask, label=label, affine=affine, seed=seed,
                         lesion_sites=sites, brain_mask=brain)


def lesion_slices(p: PhantomVolume) -> npt.NDArray[np.bool_]:
    """Which axial slices show any lesion: slice-level ground truth."""
    return np.asarray(p.lesion_mask.any(axis=(1, 2)))



# --------------------------------------------------------------------------------------------
# One series: its grid, its plan and its truth
# --------------------------------------------------------------------------------------------


_DEFAULT_SLICES = {"axial": 24, "oblique": 24, "sagittal": 152}
_UID_ROOT = "flaircad-phantom"


def _series_geometry(anatomy: Anatomy, label: str, seed: int, variant: str, slices: int,
                     matrix: int = 256, pixel_mm: float = 0.9375,
                     slice_thickness_mm: float = 5.0) -> _Geometry:
    """The grid of one variant (``matrix``, ``pixel_mm`` and ``slice_thickness_mm``: the axial
    variant's only)."""
    if variant == "axial":
        return _axial_geometry(anatomy, slices, matrix, slice_thickness_mm, pixel_mm)
    brain = np.round(anatomy.brain_centre_lps(), 1)
    if variant == "sagittal":
        # columns run anterior->posterior, rows superior->inferior; slices step right->left
        centre = np.array([round(float(anatomy.centre_lps[0]), 1), 0.0, brain[2] - 10.0])
        geometry = _slab(centre, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]),
                         slices, 200, 200, 1.2, 1.2, 1.2)
        order = np.argsort(geometry.positions[:, 0], kind="stable")
        return replace(geometry, positions=geometry.positions[order])
    rng = np.random.default_rng([seed, 4, _check_label(label)])
    tilt = math.radians(float(rng.uniform(10.0, 20.0)) * float(rng.choice([-1.0, 1.0])))
    yaw = math.radians(float(rng.uniform(2.0, 5.0)) * float(rng.choice([-1.0, 1.0])))
    turn = _rotation(tilt, 0.0, yaw)
    return _slab(brain, turn[:, 0], turn[:, 1], slices, 256, 256, 0.9375, 5.0, 5.0)


def _uid(label: str, seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=[_UID_ROOT, label, str(seed), *(str(p) for p in parts)])


@dataclass(frozen=True, eq=False)
class _Plan:
    """What one series is: its anatomy (shift applied), grid and what names its UIDs."""

    anatomy: Anatomy
    variant: str
    geometry: _Geometry
    shift: Shift
    uid_parts: tuple[object, ...]  # variant, slices, then what differs from the defaults


def _plan(label: str, seed: int, variant: str, slices: int | None, shift: Shift | None,
          matrix: int | None, pixel_mm: float | None,
          slice_thickness_mm: float | None) -> _Plan:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n_slices = _DEFAULT_SLICES[variant] if slices is None else int(slices)
    if n_slices < 1:
        raise ValueError("slices must be positive")
    if shift is not None and not isinstance(shift, Shift):
        raise TypeError(f"shift must be a Shift or None, got {type(shift).__name__}")
    given = {"matrix": matrix, "pixel_mm": pixel_mm, "slice_thickness_mm": slice_thickness_mm}
    if variant != "axial" and any(v is not None for v in given.values()):
        raise ValueError("matrix, pixel_mm and slice_thickness_mm apply to the axial variant "
                         f"only, not to {variant!r}")
    if matrix is not None and int(matrix) != matrix:
        raise ValueError(f"matrix must be a whole number, got {matrix!r}")
    grid = {k: _AXIAL_GRID[k] if v is None else float(v) for k, v in given.items()}
    anatomy = make_anatomy(label, seed, shift)
    geometry = _series_geometry(anatomy, label, seed, variant, n_slices, int(grid["matrix"]),
                                float(grid["pixel_mm"]), float(grid["slice_thickness_mm"]))
    shift = _NO_SHIFT if shift is None else shift
    # only what is not the default enters the UIDs, so default series keep theirs
    extra: list[str] = []
    if not shift.is_default:
        extra.append(f"shift {shift!r}")
    if variant == "axial" and (geometry.rows, geometry.pixel, geometry.thickness) != (
            _AXIAL_GRID["matrix"], _AXIAL_GRID["pixel_mm"], _AXIAL_GRID["slice_thickness_mm"]):
        extra.append(f"grid {geometry.rows} {geometry.pixel!r} {geometry.thickness!r}")
    return _Plan(anatomy, variant, geometry, shift, (variant, n_slices, *extra))


@dataclass(frozen=True, eq=False)
class SeriesTruth:
    """Ground truth on the grid of one written series.

    ``lesion_mask[k]`` and ``brain_mask[k]`` belong to file ``IM{k+1:04d}.dcm`` (instance
    number k + 1) and have its pixel array's (rows, columns); the geometry is that of the
    headers (``ImagePositionPatient`` per file, ``ImageOrientationPatient``, ``PixelSpacing``)."""

    label: str
    seed: int
    variant: str
    shift: Shift
    lesion_mask: BoolArray  # (n_files, rows, cols)
    brain_mask: BoolArray  # (n_files, rows, cols), see PhantomVolume.brain_mask
    positions_lps: F64Array  # (n_files, 3): ImagePositionPatient of each file
    row_dir: F64Array  # first IOP triplet: direction of increasing column index
    col_dir: F64Array  # second IOP triplet: direction of increasing row index
    pixel_spacing_mm: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slice_thickness_mm: float
    spacing_between_slices_mm: float
    series_instance_uid: str

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, cols = self.lesion_mask.shape
        return int(n), int(rows), int(cols)

    def points(self) -> F64Array:
        """LPS position (mm) of every voxel, shape (n_files, rows, cols, 3)."""
        return _Geometry(self.positions_lps, self.row_dir, self.col_dir,
                         self.pixel_spacing_mm[0], *self.shape[1:], self.slice_thickness_mm,
                         self.spacing_between_slices_mm).points()


def _series_uid(label: str, seed: int, plan: _Plan) -> UID:
    return _uid(label, seed, *plan.uid_parts, "series")


def _truth(label: str, seed: int, plan: _Plan, lesion_mask: BoolArray,
           brain_mask: BoolArray) -> SeriesTruth:
    g = plan.geometry
    return SeriesTruth(
        label=label, seed=seed, variant=plan.variant, shift=plan.shift,
        lesion_mask=lesion_mask, brain_mask=brain_mask, positions_lps=g.positions.copy(),
        row_dir=g.row_dir.copy(), col_dir=g.col_dir.copy(),
        pixel_spacing_mm=(g.pixel, g.pixel), slice_thickness_mm=g.thickness,
        spacing_between_slices_mm=g.spacing, series_instance_uid=_series_uid(label, seed, plan),
    )


def series_truth(
    label: str,
    seed: int,
    *,
    variant: str = "axial",
    slices: int | None = None,
    shift: Shift | None = None,
    matrix: int | None = None,
    pixel_mm: float | None = None,
    slice_thickness_mm: float | None = None,
) -> SeriesTruth:
    """The lesion and brain masks of the series :func:`write_dicom_series` writes for the same
    arguments, voxel for voxel, without writing it. The masks do not depend on noise, so this
    renders the noiseless phantom once (about half the cost of writing the series); callers
    that write the series anyway get the same truth from ``write_dicom_series(truth=True)``."""
    plan = _plan(label, seed, variant, slices, shift, matrix, pixel_mm, slice_thickness_mm)
    _, mask, _, brain = _render(plan.anatomy, plan.geometry.points(), None, brain=True)
    assert brain is not None
    return _truth(label, seed, plan, mask, brain)
