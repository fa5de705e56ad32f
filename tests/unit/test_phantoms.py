"""The synthetic FLAIR phantoms: ground truth, class-defining properties, DICOM fidelity."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from service.core.preprocess import reorient_to_canonical
from service.phantoms import (
    CLASS_NAMES,
    COMPRESSIONS,
    PhantomVolume,
    SeriesTruth,
    Shift,
    generate_phantom,
    lesion_slices,
    make_anatomy,
    render,
    series_truth,
    write_dicom_series,
    write_lesion_seg,
)
from service.phantoms.geometry import _noise_rng
from service.phantoms.rendering import _render
from tests.conftest import require

# A coarse grid keeps the population tests fast: 1.875 mm in-plane, 3 mm slices.
COARSE = {"matrix": 128, "pixel_mm": 1.875, "slices": 40, "slice_thickness_mm": 3.0}
SEEDS = range(20)


def grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """LPS position of every voxel of an array with this affine."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def load_ml(p: PhantomVolume) -> float:
    return float(p.lesion_mask.sum()) * abs(np.linalg.det(p.affine[:3, :3])) / 1000.0


def mirrored_dice(p: PhantomVolume) -> float:
    """Overlap of the lesion mask with its left-right mirror image about the head's centre."""
    centre = make_anatomy(p.label, p.seed).centre_lps
    column = (np.linalg.inv(p.affine) @ np.r_[centre, 1.0])[2]
    mask = p.lesion_mask
    shift = round(2 * column) - (mask.shape[2] - 1)
    mirror = np.roll(np.flip(mask, axis=2), shift, axis=2)
    return 2.0 * float((mask & mirror).sum()) / max(float(mask.sum() + mirror.sum()), 1.0)


@pytest.fixture(scope="module")
def population() -> dict[str, list[PhantomVolume]]:
    return {label: [generate_phantom(label, s, **COARSE) for s in SEEDS] for label in CLASS_NAMES}


@pytest.fixture(scope="module")
def axial_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], PhantomVolume]:
    paths = write_dicom_series("MS", 7, tmp_path_factory.mktemp("axial"))
    return paths, generate_phantom("MS", 7)


def read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def dicom_points(ds_list: list[pydicom.Dataset]) -> np.ndarray:
    """LPS position of every pixel, from the headers alone (DICOM semantics: the first IOP
    triplet is the direction of increasing column index)."""
    row_dir = np.array([float(v) for v in ds_list[0].ImageOrientationPatient[:3]])
    col_dir = np.array([float(v) for v in ds_list[0].ImageOrientationPatient[3:]])
    d_row, d_col = (float(v) for v in ds_list[0].PixelSpacing)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in ds_list])
    c = np.arange(ds_list[0].Columns, dtype=np.float64)[:, None] * (d_col * row_dir)
    r = np.arange(ds_list[0].Rows, dtype=np.float64)[:, None] * (d_row * col_dir)
    return positions[:, None, None, :] + r[None, :, None, :] + c[None, None, :, :]


def rescaled(ds_list: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                     for ds in ds_list])


# --------------------------------------------------------------------------------------------
# Phantom volumes
# --------------------------------------------------------------------------------------------


def test_class_names_and_labels() -> None:
    assert CLASS_NAMES == ("MS", "cSVD")
    for label in CLASS_NAMES:
        p = generate_phantom(label, 1, **COARSE)
        assert p.label == label and p.seed == 1
        assert make_anatomy(label, 1).label == label
    with pytest.raises(ValueError, match="label"):
        make_anatomy("ms", 1)
    with pytest.raises(ValueError, match="seed"):
        make_anatomy("MS", -1)


def test_generation_is_deterministic_and_seeded() -> None:
    a, b = generate_phantom("cSVD", 5), generate_phantom("cSVD", 5)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    np.testing.assert_array_equal(a.affine, b.affine)
    c = generate_phantom("cSVD", 6)
    assert not np.array_equal(a.volume, c.volume)
    assert not np.array_equal(a.lesion_mask, c.lesion_mask)
    # same seed, other class: same head, different lesions
    d = generate_phantom("MS", 5)
    assert not np.array_equal(a.lesion_mask, d.lesion_mask)


def test_default_grid_is_canonical_spl() -> None:
    p = generate_phantom("MS", 2)
    assert p.volume.shape == (24, 256, 256) and p.volume.dtype == np.float32
    assert p.lesion_mask.shape == p.volume.shape and p.lesion_mask.dtype == bool
    np.testing.assert_allclose(p.affine[:3, :3], [[0, 0, 0.9375], [0, 0.9375, 0], [5, 0, 0]])
    canonical = reorient_to_canonical(p.volume, p.affine)
    assert canonical.source_axes == (0, 1, 2) and canonical.flipped == (False, False, False)
    assert 500.0 < float(p.volume.max()) < 3000.0  # scanner-like intensities
    # the slab is centred on the brain: tissue in the middle slices, little at the ends
    per_slice = (p.volume > 300).mean(axis=(1, 2))
    assert per_slice[12] > 0.3 and per_slice[12] > 2 * per_slice[-1]


def test_render_agrees_with_the_affine_on_any_point_layout() -> None:
    p = generate_phantom("MS", 3, **COARSE)
    anatomy = make_anatomy("MS", 3)
    points = grid_points(p.affine, p.volume.shape)
    image, mask = render(anatomy, points, None)
    assert image.shape == mask.shape == p.volume.shape
    # the mask does not depend on noise; voxel positions from the affine reproduce it
    assert int((mask != p.lesion_mask).sum()) <= 2
    flat_image, flat_mask = render(anatomy, points.reshape(-1, 3), None)
    np.testing.assert_array_equal(flat_image.reshape(image.shape), image)
    np.testing.assert_array_equal(flat_mask.reshape(mask.shape), mask)
    # noise and bias change intensities only, by roughly the noise level in the brain
    noisy, _ = render(anatomy, points, np.random.default_rng(0))
    brain = image > 300
    relative = np.abs(noisy[brain] - image[brain]) / image[brain]
    assert 0.005 < float(np.median(relative)) < 0.3


def test_lesion_slices_flags_exactly_the_slices_with_lesion() -> None:
    p = generate_phantom("cSVD", 4, **COARSE)
    flags = lesion_slices(p)
    assert flags.shape == (p.volume.shape[0],) and flags.dtype == bool
    assert flags.any() and not flags.all()
    for k, flag in enumerate(flags):
        assert flag == bool(p.lesion_mask[k].any())


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_lesions_are_hyperintense(label: str) -> None:
    for seed in (0, 1, 2):
        p = generate_phantom(label, seed)
        anatomy = make_anatomy(label, seed)
        assert p.lesion_mask.any()
        # white matter: where the lesion-free, noiseless phantom has the white-matter value
        clean, _ = render(replace(anatomy, lesions=(), bands=()),
                          grid_points(p.affine, p.volume.shape), None)
        wm_value = anatomy.contrast.wm * anatomy.contrast.gain
        wm = (np.abs(clean - wm_value) < 0.01 * wm_value) & ~p.lesion_mask
        assert wm.sum() > 10_000
        lesion_mean = float(p.volume[p.lesion_mask].mean())
        assert lesion_mean > 1.25 * float(p.volume[wm].mean())
        # ... and brighter than the cortex value
        assert lesion_mean > anatomy.contrast.gm * anatomy.contrast.gain


def test_ventricles_are_dark() -> None:
    for seed in range(5):
        anatomy = make_anatomy("MS", seed)
        v, c = anatomy.ventricles, anatomy.contrast
        centres = [[side * v.x0, v.y0, v.z0] for side in (1, -1)]
        image, mask = render(anatomy, anatomy.to_lps(centres), None)
        assert not mask.any()
        assert (image < 0.3 * c.wm * c.gain).all()
        third, _ = render(anatomy, anatomy.to_lps([anatomy.structure("third")[0]]), None)
        assert third[0] < 0.3 * c.wm * c.gain


def test_lesion_loads_overlap_between_classes(population: dict[str, list[PhantomVolume]]) -> None:
    loads = {label: np.array([load_ml(p) for p in ps]) for label, ps in population.items()}
    ms, csvd = loads["MS"], loads["cSVD"]
    assert (ms > 0).all() and (csvd > 0).all()
    low, high = max(ms.min(), csvd.min()), min(ms.max(), csvd.max())
    assert low < high
    # a broad overlap, not two touching ranges: most phantoms of each class lie inside it
    for values in (ms, csvd):
        assert ((values >= low) & (values <= high)).mean() >= 0.6
        assert (values < 2.0).sum() >= 2  # small loads exist in both classes
        assert values.max() > 10.0


def test_csvd_is_symmetric_and_ms_is_not(population: dict[str, list[PhantomVolume]]) -> None:
    dice = {label: np.array([mirrored_dice(p) for p in ps]) for label, ps in population.items()}
    assert dice["cSVD"].mean() > dice["MS"].mean() + 0.1
    assert np.median(dice["MS"]) < 0.15


def test_lesion_sites_follow_the_class() -> None:
    ms_sites = {les.site for s in range(10) for les in make_anatomy("MS", s).lesions}
    assert {"periventricular", "juxtacortical", "infratentorial", "callosal"} <= ms_sites
    for s in range(10):
        anatomy = make_anatomy("MS", s)
        assert not anatomy.bands and anatomy.fazekas == 0
        assert all(les.kind == "ovoid" for les in anatomy.lesions)
    grades, lacunes = set(), 0
    for s in range(20):
        anatomy = make_anatomy("cSVD", s)
        assert len(anatomy.bands) == 2 and {b.side for b in anatomy.bands} == {1, -1}
        assert not {les.site for les in anatomy.lesions} & {"juxtacortical", "callosal"}
        grades.add(anatomy.fazekas)
        lacunes += sum(les.kind == "lacune" for les in anatomy.lesions)
    assert grades == {1, 2, 3} and lacunes > 0


def test_dawson_fingers_point_away_from_the_ventricles() -> None:
    angles = []
    for s in range(6):
        anatomy = make_anatomy("MS", s)
        v = anatomy.ventricles
        for les in anatomy.lesions:
            if les.site != "periventricular":
                continue
            long_axis = les.axes[:, int(np.argmax(les.radii))]
            side = 1 if les.centre[0] > 0 else -1
            h = 0.25
            grad = np.array([
                float(v.frame(side, *(les.centre + h * e))[0])
                - float(v.frame(side, *(les.centre - h * e))[0]) for e in np.eye(3)
            ])
            cos = abs(grad @ long_axis) / np.linalg.norm(grad)
            angles.append(math.degrees(math.acos(min(cos, 1.0))))
    assert len(angles) >= 10
    assert np.median(angles) < 25.0  # long axis roughly along the wall's normal


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def test_axial_series_is_valid_mr_dicom(axial_series: tuple[list[Path], PhantomVolume]) -> None:
    paths, _ = axial_series
    assert [p.name for p in paths] == [f"IM{k:04d}.dcm" for k in range(1, 25)]
    datasets = read(paths)
    for k, (path, ds) in enumerate(zip(paths, datasets, strict=True)):
        assert path.read_bytes()[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "MR" and ds.InstanceNumber == k + 1
        assert "IR" in list(ds.ScanningSequence)
        assert 1500 <= float(ds.InversionTime) <= 3000
        assert ds.MRAcquisitionType == "2D"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
        assert ds.PatientID == "PHANTOM-MS-0007" and ds.PatientBirthDate == ""
        assert (ds.Rows, ds.Columns, ds.BitsStored, ds.PixelRepresentation) == (256, 256, 16, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert len({ds.SOPInstanceUID for ds in datasets}) == 24
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1


def test_axial_geometry_and_pixels_match_the_phantom(
    axial_series: tuple[list[Path], PhantomVolume],
) -> None:
    paths, phantom = axial_series
    datasets = read(paths)
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    np.testing.assert_array_equal(iop, [1, 0, 0, 0, 1, 0])
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    steps = np.diff(positions, axis=0)
    spacing = float(datasets[0].SpacingBetweenSlices)
    np.testing.assert_allclose(steps @ normal, spacing, atol=1e-4)
    np.testing.assert_allclose(steps - np.outer(steps @ normal, normal), 0.0, atol=1e-4)
    assert [float(v) for v in datasets[0].PixelSpacing] == [0.9375, 0.9375]
    assert float(datasets[0].SliceThickness) == 5.0
    # the headers describe exactly the phantom's grid
    np.testing.assert_allclose(dicom_points(datasets), grid_points(phantom.affine, (24, 256, 256)),
                               atol=1e-6)
    # stored values reproduce the rendered intensities within half a quantisation step
    slope = float(datasets[0].RescaleSlope)
    assert all(float(ds.RescaleSlope) == slope for ds in datasets)
    values = rescaled(datasets)
    assert float(np.abs(values - phantom.volume).max()) <= slope / 2 + 1e-4
    assert int(max(ds.pixel_array.max() for ds in datasets)) > 30_000  # the range is used


@pytest.mark.parametrize("compress", ["jpegls", "jpeg2000", "rle"])
def test_compressed_series_round_trip_exactly(tmp_path: Path, compress: str) -> None:
    plain = read(write_dicom_series("cSVD", 3, tmp_path / "plain", slices=3))
    packed = read(write_dicom_series("cSVD", 3, tmp_path / compress, slices=3, compress=compress))
    for a, b in zip(plain, packed, strict=True):
        assert b.file_meta.TransferSyntaxUID == COMPRESSIONS[compress]
        assert b.file_meta.TransferSyntaxUID.is_compressed
        assert a.SOPInstanceUID == b.SOPInstanceUID  # lossless: the same image
        if compress != "rle":  # RLE cannot shrink noisy 16-bit data, only carry it
            assert len(b.PixelData) < 0.9 * len(a.PixelData)
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


def test_jpeg_lossless_raises_only_when_pydicom_cannot_encode_it(tmp_path: Path) -> None:
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEGLosslessSV1

    try:
        encodable = get_encoder(JPEGLosslessSV1).is_available
    except NotImplementedError:
        encodable = False
    if encodable:
        plain = read(write_dicom_series("MS", 3, tmp_path / "plain", slices=2))
        packed = read(write_dicom_series("MS", 3, tmp_path / "jl", slices=2,
                                         compress="jpeg-lossless"))
        for a, b in zip(plain, packed, strict=True):
            np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    else:
        with pytest.raises(ValueError, match="JPEG Lossless"):
            write_dicom_series("MS", 3, tmp_path, slices=2, compress="jpeg-lossless")
        assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="compress"):
        write_dicom_series("MS", 3, tmp_path, slices=2, compress="png")
    with pytest.raises(ValueError, match="variant"):
        write_dicom_series("MS", 3, tmp_path, variant="coronal")


def test_sagittal_3d_series(tmp_path: Path) -> None:
    paths = write_dicom_series("MS", 11, tmp_path, variant="sagittal", compress="jpegls")
    datasets = read(paths)
    assert len(datasets) > 100
    ds0 = datasets[0]
    assert [float(v) for v in ds0.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    assert ds0.MRAcquisitionType == "3D" and ds0.SeriesDescription == "SAG 3D FLAIR"
    assert "IR" in list(ds0.ScanningSequence) and 1500 <= float(ds0.InversionTime) <= 3000
    spacing = float(ds0.SpacingBetweenSlices)
    assert 1.0 <= spacing <= 1.2 and float(ds0.PixelSpacing[0]) == spacing
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(np.abs(steps[:, 0]), spacing, atol=1e-4)  # along the normal
    np.testing.assert_allclose(steps[:, 1:], 0.0, atol=1e-4)
    # pixels are the phantom rendered at exactly the positions the headers describe
    anatomy = make_anatomy("MS", 11)
    points = dicom_points(datasets)
    expected, _ = render(anatomy, points, _noise_rng("MS", 11, "sagittal"))
    slope = float(ds0.RescaleSlope)
    assert float(np.abs(rescaled(datasets) - expected).max()) <= slope / 2 + 1e-3
    # the slab covers the whole head: nothing but air in the outermost slices
    ends, _ = render(anatomy, points[[0, -1]], None)
    assert float(ends.max()) < 1.0


def test_oblique_series(tmp_path: Path) -> None:
    datasets = read(write_dicom_series("cSVD", 2, tmp_path, variant="oblique", slices=20))
    assert len(datasets) == 20
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    np.testing.assert_allclose([row_dir @ row_dir, col_dir @ col_dir], 1.0, atol=1e-5)
    assert abs(row_dir @ col_dir) < 1e-5
    tilt = math.degrees(math.asin(abs(col_dir[2])))  # about the left-right axis
    yaw = math.degrees(math.atan2(abs(row_dir[1]), row_dir[0]))  # and a little about S
    assert 10.0 <= tilt <= 20.0 and 1.0 <= yaw <= 6.0
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    steps = np.diff(positions, axis=0)
    spacing = float(datasets[0].SpacingBetweenSlices)
    np.testing.assert_allclose(steps @ normal, spacing, atol=1e-4)
    np.testing.assert_allclose(steps - np.outer(steps @ normal, normal), 0.0, atol=1e-4)
    expected, _ = render(make_anatomy("cSVD", 2), dicom_points(datasets),
                         _noise_rng("cSVD", 2, "oblique"))
    slope = float(datasets[0].RescaleSlope)
    assert float(np.abs(rescaled(datasets) - expected).max()) <= slope / 2 + 1e-3


def test_writing_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    first = write_dicom_series("cSVD", 9, tmp_path / "a", slices=3, compress="jpeg2000")
    second = write_dicom_series("cSVD", 9, tmp_path / "b", slices=3, compress="jpeg2000")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = read(write_dicom_series("cSVD", 10, tmp_path / "c", slices=3))
    assert other[0].StudyInstanceUID != pydicom.dcmread(first[0]).StudyInstanceUID
    assert first[0].read_bytes() != (tmp_path / "c" / "IM0001.dcm").read_bytes()


# --------------------------------------------------------------------------------------------
# Distribution shifts
# --------------------------------------------------------------------------------------------

# a small axial grid for the shift tests: 1.875 mm in-plane, 12 slices of 5 mm
SMALL = {"matrix": 128, "pixel_mm": 1.875, "slices": 12, "slice_thickness_mm": 5.0}


def dilate(mask: np.ndarray, steps: int = 1, axes: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Binary dilation by a 3x3x3 cube (a 3x3 square for ``axes=(1, 2)``), ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        for axis in axes:
            grown = out.copy()
            lo = [slice(None)] * out.ndim
            hi = [slice(None)] * out.ndim
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            grown[tuple(lo)] |= out[tuple(hi)]
            grown[tuple(hi)] |= out[tuple(lo)]
            out = grown
    return out


def is_one_component(mask: np.ndarray) -> bool:
    """Whether the True voxels form one 6-connected component."""
    region = np.zeros_like(mask)
    region[tuple(np.argwhere(mask)[0])] = True
    while True:
        grown = region.copy()
        for axis in range(mask.ndim):
            grown |= np.roll(region, 1, axis) | np.roll(region, -1, axis)
        grown &= mask
        if np.array_equal(grown, region):
            return bool(np.array_equal(region, mask))
        region = grown


def tissue_mask(anatomy: object, p: PhantomVolume, value: float) -> np.ndarray:
    """Voxels of ``p`` whose lesion-free, noiseless rendering has exactly one tissue's value."""
    assert isinstance(anatomy, type(make_anatomy("MS", 0)))
    clean, _ = render(replace(anatomy, lesions=(), bands=()), grid_points(p.affine,
                      p.volume.shape), None)
    target = value * anatomy.contrast.gain
    return np.asarray(np.abs(clean - target) < 0.005 * target)


def assert_same_head_except_lesions(p: PhantomVolume, base: PhantomVolume,
                                    fraction: float = 0.1) -> np.ndarray:
    """``p`` and ``base`` differ only in the brain (lesions are painted into it, with a
    partial-volume edge), there in at most ``fraction`` of it; returns where they differ."""
    assert base.brain_mask is not None
    np.testing.assert_array_equal(p.brain_mask, base.brain_mask)  # type: ignore[arg-type]
    changed = np.asarray(p.volume != base.volume)
    assert not (changed & ~dilate(base.brain_mask, 1)).any()
    assert changed.sum() < fraction * base.brain_mask.sum()
    return changed


def test_default_shift_changes_nothing(tmp_path: Path) -> None:
    assert Shift() == Shift(1, 1, "flair", "default") and Shift().is_default
    assert not Shift(noise_scale=2).is_default and Shift(noise_scale=2) == Shift(2.0)
    for label in CLASS_NAMES:
        plain = generate_phantom(label, 4, **SMALL)
        for shift in (None, Shift()):
            p = generate_phantom(label, 4, **SMALL, shift=shift)
            for name in ("volume", "lesion_mask", "lesion_sites", "brain_mask", "affine"):
                np.testing.assert_array_equal(getattr(p, name), getattr(plain, name))
    a, b = make_anatomy("cSVD", 4), make_anatomy("cSVD", 4, Shift())
    assert a.contrast == b.contrast and a.noise_sigma == b.noise_sigma
    assert len(a.lesions) == len(b.lesions) and a.bands == b.bands
    first = write_dicom_series("MS", 4, tmp_path / "a", slices=2)
    second = write_dicom_series("MS", 4, tmp_path / "b", slices=2, shift=Shift(),
                                matrix=256, pixel_mm=0.9375, slice_thickness_mm=5.0)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_shift_arguments_are_checked(tmp_path: Path) -> None:
    for bad in ({"noise_scale": 0.0}, {"fat_scale": -1.0}, {"noise_scale": math.nan},
                {"contrast": "t2"}, {"lesions": "many"}):
        with pytest.raises(ValueError):
            Shift(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="axial"):
        write_dicom_series("MS", 1, tmp_path, variant="sagittal", slices=2, matrix=128)
    with pytest.raises(ValueError, match="axial"):
        series_truth("MS", 1, variant="oblique", slices=2, pixel_mm=1.0)
    assert not list(tmp_path.iterdir())


def test_noise_shift_scales_the_noise() -> None:
    base = generate_phantom("MS", 2, **SMALL)
    noisy = generate_phantom("MS", 2, **SMALL, shift=Shift(noise_scale=2.0))
    assert make_anatomy("MS", 2, Shift(noise_scale=2.0)).noise_sigma == pytest.approx(
        2.0 * make_anatomy("MS", 2).noise_sigma)
    np.testing.assert_array_equal(noisy.lesion_mask, base.lesion_mask)
    air = ~dilate(base.volume > 100.0, 2)  # far from the head: Rician noise only
    assert air.sum() > 10_000
    assert float(noisy.volume[air].mean()) == pytest.approx(2.0 * float(base.volume[air].mean()),
                                                            rel=1e-3)
    brain = base.brain_mask
    assert brain is not None
    assert float(np.std(noisy.volume[brain] - base.volume[brain])) > 5.0


def test_fat_shift_brightens_fat_only() -> None:
    anatomy = make_anatomy("cSVD", 6)
    shifted = make_anatomy("cSVD", 6, Shift(fat_scale=1.25))
    assert shifted.contrast.fat == pytest.approx(1.25 * anatomy.contrast.fat)
    assert replace(shifted.contrast, fat=anatomy.contrast.fat) == anatomy.contrast
    base = generate_phantom("cSVD", 6, **SMALL)
    bright = generate_phantom("cSVD", 6, **SMALL, shift=Shift(fat_scale=1.25))
    fat = tissue_mask(anatomy, base, anatomy.contrast.fat)
    assert fat.sum() > 500
    ratio = float(bright.volume[fat].mean()) / float(base.volume[fat].mean())
    assert 1.2 < ratio < 1.3
    assert base.brain_mask is not None
    np.testing.assert_array_equal(bright.volume[base.brain_mask], base.volume[base.brain_mask])
    np.testing.assert_array_equal(bright.lesion_mask, base.lesion_mask)


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_t1_contrast(label: str) -> None:
    anatomy = make_anatomy(label, 1, Shift(contrast="t1"))
    c = anatomy.contrast
    assert c.wm > c.deep_gm > c.gm > c.lesion > c.csf and c.fat > c.wm and c.diploe > c.gm
    assert make_anatomy(label, 1).contrast.gain == c.gain  # the same scanner
    p = generate_phantom(label, 1, **SMALL, shift=Shift(contrast="t1"))
    wm, gm = tissue_mask(anatomy, p, c.wm), tissue_mask(anatomy, p, c.gm)
    assert wm.sum() > 5_000 and gm.sum() > 2_000
    wm_mean = float(p.volume[wm & ~p.lesion_mask].mean())
    assert wm_mean > 1.25 * float(p.volume[gm].mean())
    # lesions are hypointense; the lesion mask is (nearly) the FLAIR one
    assert float(p.volume[p.lesion_mask].mean()) < 0.8 * wm_mean
    flair = generate_phantom(label, 1, **SMALL)
    overlap = (flair.lesion_mask & p.lesion_mask).sum() / (flair.lesion_mask | p.lesion_mask).sum()
    assert overlap > 0.9
    # the ventricles are dark and the scalp fat bright
    v = anatomy.ventricles
    image, _ = render(anatomy, anatomy.to_lps([[s * v.x0, v.y0, v.z0] for s in (1, -1)]), None)
    assert (image < 0.2 * c.wm * c.gain).all()
    fat = tissue_mask(anatomy, p, c.fat)
    assert fat.sum() > 500 and float(p.volume[fat].mean()) > wm_mean


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_lesion_free_shift(label: str) -> None:
    anatomy = make_anatomy(label, 3, Shift(lesions="none"))
    assert anatomy.lesions == () and anatomy.bands == () and anatomy.load_target_ml == 0.0
    p = generate_phantom(label, 3, **SMALL, shift=Shift(lesions="none"))
    assert not p.lesion_mask.any() and not p.lesion_sites.any()  # type: ignore[union-attr]
    # the same head, the same noise: only where the default phantom has lesions it differs
    base = generate_phantom(label, 3, **SMALL)
    assert base.lesion_mask.any()
    assert_same_head_except_lesions(p, base)


@pytest.mark.parametrize(("label", "seed"), [("MS", 0), ("cSVD", 5), ("MS", 9)])
def test_mass_shift(label: str, seed: int) -> None:
    shift = Shift(lesions="mass")
    anatomy = make_anatomy(label, seed, shift)
    assert len(anatomy.lesions) == 1 and anatomy.bands == ()
    mass = anatomy.lesions[0]
    assert mass.kind == "mass" and mass.rim_mm > 3.0
    nominal = float(np.prod(mass.radii + mass.rim_mm)) ** (1 / 3)
    assert 18.0 <= nominal <= 36.0
    # its own random stream: the head and contrast are the default draw's
    default = make_anatomy(label, seed)
    assert anatomy.contrast == default.contrast and anatomy.noise_sigma == default.noise_sigma
    np.testing.assert_array_equal(anatomy.rotation, default.rotation)

    grid = {"matrix": 128, "pixel_mm": 1.875, "slices": 36, "slice_thickness_mm": 4.0}
    p = generate_phantom(label, seed, **grid, shift=shift)
    mask = p.lesion_mask
    volume_ml = float(mask.sum()) * 1.875 * 1.875 * 4.0 / 1000.0
    radius = (volume_ml * 1000.0 * 3.0 / (4.0 * math.pi)) ** (1 / 3)
    assert 15.0 <= radius <= 36.0, radius
    assert is_one_component(mask)
    assert p.brain_mask is not None and not (mask & ~p.brain_mask).any()
    # in one hemisphere (head frame x: left positive)
    local = anatomy.to_local(grid_points(p.affine, mask.shape)[mask])
    assert (local[:, 0] > 0).all() or (local[:, 0] < 0).all()
    # hyperintense, core and oedema alike, against normal white matter
    wm = tissue_mask(anatomy, p, anatomy.contrast.wm) & ~dilate(mask, 2)
    wm_mean = float(p.volume[wm].mean())
    rim = mask & ~np.roll(mask, 3, axis=2)  # a shell on one side
    assert float(p.volume[mask].mean()) > 1.4 * wm_mean
    assert float(p.volume[rim].mean()) > 1.4 * wm_mean
    # elsewhere the image is the default phantom's (the same head, the same noise)
    base = generate_phantom(label, seed, **grid)
    changed = assert_same_head_except_lesions(p, base, fraction=0.3)
    assert (changed & ~dilate(mask | base.lesion_mask, 2)).sum() <= 0.05 * changed.sum()


# --------------------------------------------------------------------------------------------
# Brain mask and series truth
# --------------------------------------------------------------------------------------------


def test_brain_mask_is_the_intracranial_brain() -> None:
    grid = {"matrix": 128, "pixel_mm": 1.875, "slices": 40, "slice_thickness_mm": 4.0}
    for label, seed in (("MS", 2), ("cSVD", 7)):
        p = generate_phantom(label, seed, **grid)
        anatomy = make_anatomy(label, seed)
        c = anatomy.contrast
        brain = p.brain_mask
        assert brain is not None and brain.dtype == bool and brain.shape == p.volume.shape
        # the whole brain is in the slab: a brain's volume, and none at the slab's ends
        ml = float(brain.sum()) * 1.875 * 1.875 * 4.0 / 1000.0
        assert 900.0 < ml < 1900.0, ml
        assert not brain[0].any() and not brain[-1].any()
        assert not (p.lesion_mask & ~brain).any()  # lesions lie in it
        # the lateral ventricles are inside; fat and muscle of the scalp are not; nor air
        local = anatomy.to_local(grid_points(p.affine, p.volume.shape)).astype(np.float32)
        walls = [anatomy.ventricles.frame(side, local[..., 0], local[..., 1], local[..., 2])[0]
                 for side in (1, -1)]
        ventricle = np.minimum(*walls) < -0.5
        assert ventricle.sum() > 200 and brain[ventricle].all()
        fat = tissue_mask(anatomy, p, c.fat)
        assert fat.sum() > 500 and not brain[fat].any()
        clean, _ = render(anatomy, grid_points(p.affine, p.volume.shape), None)
        head = clean > 0.5 * c.muscle * c.gain
        air = np.zeros_like(head)  # what of ~head each slice's border reaches
        air[:, [0, -1], :] = air[:, :, [0, -1]] = True
        air &= ~head
        while not np.array_equal(grown := dilate(air, 1, axes=(1, 2)) & ~head, air):
            air = grown
        scalp = ~air & dilate(air, 3, axes=(1, 2))  # the outer 5.6 mm of the head
        assert scalp.sum() > 5000 and not brain[scalp].any()
        assert not brain[:, :5, :].any() and not brain[:, :, :5].any()
        # the whole of the brain: cerebrum, cerebellum, brainstem, deep structures
        names = ["cerebellum", "vermis", "brainstem", "thalamus", "lentiform", "third", "fourth"]
        centres = [anatomy.structure(n)[0] for n in names]
        v = anatomy.ventricles
        centres += [[s * v.x0, v.y0, v.z0] for s in (1, -1)]
        _, _, _, inside = _render(anatomy, anatomy.to_lps(centres), None, brain=True)
        assert inside is not None and inside.all()
        # along a line up from the centre: brain, then (further out) the scalp, then air
        up = anatomy.to_lps(np.outer(np.arange(0.0, 110.0, 0.5), [0.0, 0.0, 1.0]))
        image, _, _, line = _render(anatomy, up, None, brain=True)
        assert line is not None
        last = int(np.flatnonzero(line).max())
        assert line[: last + 1].all()
        fat = np.flatnonzero(np.abs(image - c.fat * c.gain) < 0.05 * c.fat * c.gain)
        assert fat.size and fat.min() > last + 4  # CSF, skull and muscle lie between
        assert image[-1] < 1.0 and not line[-1]


def test_masks_come_from_the_one_rendering_pass(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """The brain mask and the series truth do not render the phantom a second time."""
    import service.phantoms.rendering as rendering

    calls = []
    paint = rendering._paint_anatomy

    def counting(*args: object) -> object:
        calls.append(1)
        return paint(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rendering, "_paint_anatomy", counting)
    anatomy = make_anatomy("MS", 3)
    p = generate_phantom("MS", 3, slices=6)
    once = len(calls)
    assert once >= 1 and p.brain_mask is not None
    calls.clear()
    render(anatomy, grid_points(p.affine, p.volume.shape), None)
    assert len(calls) == once  # the same number of chunks: one pass
    calls.clear()
    _, truth = write_dicom_series("MS", 3, tmp_path, slices=6, truth=True)
    assert len(calls) == once
    np.testing.assert_array_equal(truth.brain_mask, p.brain_mask)


def assert_truth_matches_headers(truth: SeriesTruth, paths: list[Path]) -> None:
    datasets = read(paths)
    assert truth.shape == (len(paths), datasets[0].Rows, datasets[0].Columns)
    for k, (path, ds) in enumerate(zip(paths, datasets, strict=True)):
        assert path.name == f"IM{k + 1:04d}.dcm" and ds.InstanceNumber == k + 1
        assert ds.SeriesInstanceUID == truth.series_instance_uid
        np.testing.assert_array_equal([float(v) for v in ds.ImagePositionPatient],
                                      truth.positions_lps[k])
        assert ds.pixel_array.shape == truth.shape[1:]
    assert tuple(float(v) for v in datasets[0].PixelSpacing) == truth.pixel_spacing_mm
    np.testing.assert_array_equal([float(v) for v in datasets[0].ImageOrientationPatient],
                                  np.r_[truth.row_dir, truth.col_dir])
    assert float(datasets[0].SliceThickness) == truth.slice_thickness_mm
    np.testing.assert_array_equal(truth.points(), dicom_points(datasets))


def test_series_truth_agrees_with_the_axial_phantom(tmp_path: Path) -> None:
    for kwargs in ({"slices": 6}, {"slices": 3, "matrix": 288, "pixel_mm": 230 / 288},
                   {"slices": 5, "slice_thickness_mm": 3.0, "shift": Shift(lesions="mass")}):
        truth = series_truth("cSVD", 8, **kwargs)  # type: ignore[arg-type]
        p = generate_phantom("cSVD", 8, **kwargs)  # type: ignore[arg-type]
        assert truth.variant == "axial" and truth.label == "cSVD" and truth.seed == 8
        np.testing.assert_array_equal(truth.lesion_mask, p.lesion_mask)
        np.testing.assert_array_equal(truth.brain_mask, p.brain_mask)  # type: ignore[arg-type]
        assert truth.lesion_mask.any()
        np.testing.assert_allclose(truth.points(), grid_points(p.affine, p.volume.shape),
                                   atol=1e-6)
    # the written series is what generate_phantom renders, on the truth's grid
    paths, written = write_dicom_series("cSVD", 8, tmp_path, slices=3, matrix=288,
                                        pixel_mm=230 / 288, truth=True)
    phantom = generate_phantom("cSVD", 8, slices=3, matrix=288, pixel_mm=230 / 288)
    assert written.shape == (3, 288, 288)
    np.testing.assert_array_equal(written.lesion_mask, phantom.lesion_mask)
    np.testing.assert_array_equal(written.brain_mask, phantom.brain_mask)  # type: ignore[arg-type]
    assert_truth_matches_headers(written, paths)
    datasets = read(paths)
    assert [str(v) for v in datasets[0].PixelSpacing] == ["0.798611", "0.798611"]
    slope = float(datasets[0].RescaleSlope)
    assert float(np.abs(rescaled(datasets) - phantom.volume).max()) <= slope / 2 + 1e-4


@pytest.mark.parametrize(("variant", "slices"), [("sagittal", 10), ("oblique", 4)])
def test_series_truth_on_other_grids(tmp_path: Path, variant: str, slices: int) -> None:
    paths, written = write_dicom_series("MS", 5, tmp_path, variant=variant, slices=slices,
                                        truth=True)
    truth = series_truth("MS", 5, variant=variant, slices=slices)
    assert truth.shape == ((slices, 200, 200) if variant == "sagittal" else (slices, 256, 256))
    np.testing.assert_array_equal(truth.lesion_mask, written.lesion_mask)
    np.testing.assert_array_equal(truth.brain_mask, written.brain_mask)
    assert_truth_matches_headers(truth, paths)
    # file k holds what the phantom is at the positions its headers give
    _, mask, _, brain = _render(make_anatomy("MS", 5), dicom_points(read(paths)), None,
                                brain=True)
    np.testing.assert_array_equal(truth.lesion_mask, mask)
    np.testing.assert_array_equal(truth.brain_mask, brain)  # type: ignore[arg-type]
    assert truth.brain_mask.any() and not (truth.lesion_mask & ~truth.brain_mask).any()


def test_shifted_series_uids_and_header(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    def first(**kwargs: object) -> pydicom.Dataset:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        return read(write_dicom_series("MS", 3, folder, slices=2, **kwargs))[0]  # type: ignore[call-overload]

    default = first()
    # the default UIDs are the ones phantoms always had
    assert default.SeriesInstanceUID == generate_uid(
        entropy_srcs=["flaircad-phantom", "MS", "3", "axial", "2", "series"])
    assert default.SOPInstanceUID == generate_uid(
        entropy_srcs=["flaircad-phantom", "MS", "3", "axial", "2", "instance", "0"])
    variants = [first(shift=Shift(noise_scale=2.0)), first(shift=Shift(fat_scale=1.25)),
                first(shift=Shift(contrast="t1")), first(shift=Shift(lesions="none")),
                first(shift=Shift(lesions="mass")), first(matrix=288, pixel_mm=230 / 288),
                first(slice_thickness_mm=3.0)]
    everything = [default, *variants]
    assert len({ds.SeriesInstanceUID for ds in everything}) == len(everything)
    assert len({ds.SOPInstanceUID for ds in everything}) == len(everything)
    for ds in variants:  # the same head in the same scanner
        assert ds.StudyInstanceUID == default.StudyInstanceUID
        assert ds.FrameOfReferenceUID == default.FrameOfReferenceUID
    t1 = variants[2]  # a non-FLAIR contrast that slipped through with a FLAIR header
    assert t1.SeriesDescription == "AX T2 FLAIR" and float(t1.InversionTime) == 2500.0
    assert list(t1.ScanningSequence) == ["SE", "IR"]
    assert first(shift=Shift(contrast="t1")).SOPInstanceUID == t1.SOPInstanceUID


# --------------------------------------------------------------------------------------------
# Lesion truth as DICOM SEG
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesion_seg(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], SeriesTruth, Path]:
    root = tmp_path_factory.mktemp("seg")
    paths, truth = write_dicom_series("cSVD", 1, root / "series", slices=10, truth=True)
    return paths, truth, write_lesion_seg(paths, truth, root / "lesion-seg.dcm")


def assert_seg_matches(seg_path: Path, paths: list[Path], truth: SeriesTruth) -> None:
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    sources = read(paths)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.SeriesDescription == "flaircad phantom lesion truth - RESEARCH ONLY"
    assert seg.SeriesDescription.endswith("RESEARCH ONLY")
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Lesion" and len(seg.SegmentSequence) == 1
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    uids = [ds.SOPInstanceUID for ds in sources]
    referenced = [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0]
                  .ReferencedInstanceSequence]
    assert set(referenced) == set(uids)
    # one frame per slice with lesion, each the truth of the instance it references
    nonempty = [k for k in range(truth.shape[0]) if truth.lesion_mask[k].any()]
    if not nonempty:  # nothing to omit: every frame, all empty
        assert seg.NumberOfFrames == truth.shape[0]
        nonempty = list(range(truth.shape[0]))
    assert seg.NumberOfFrames == len(nonempty)
    frames = seg.get_pixels_by_source_instance([uids[k] for k in nonempty], segment_numbers=[1])
    np.testing.assert_array_equal(frames[..., 0].astype(bool), truth.lesion_mask[nonempty])
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uids.index(source)
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in sources[k].ImagePositionPatient], atol=1e-6)


def test_lesion_seg_is_the_truth(lesion_seg: tuple[list[Path], SeriesTruth, Path],
                                 tmp_path: Path) -> None:
    paths, truth, seg_path = lesion_seg
    assert truth.lesion_mask.any() and not truth.lesion_mask.all(axis=(1, 2)).any()
    assert 0 < sum(truth.lesion_mask[k].any() for k in range(10)) < 10  # some omitted
    assert_seg_matches(seg_path, paths, truth)
    # reproducible, whatever the file order
    again = write_lesion_seg(paths[::-1], truth, tmp_path / "again.dcm")
    assert again.read_bytes() == seg_path.read_bytes()


def test_lesion_seg_on_other_grids_and_shifts(tmp_path: Path) -> None:
    cases = [("oblique", 3, Shift(lesions="mass")), ("axial", 2, Shift(lesions="none"))]
    for variant, slices, shift in cases:
        folder = tmp_path / variant
        paths, truth = write_dicom_series("MS", 6, folder / "series", variant=variant,
                                          slices=slices, shift=shift, truth=True)
        seg = write_lesion_seg(paths, truth, folder / "seg.dcm")
        assert_seg_matches(seg, paths, truth)
    with pytest.raises(ValueError, match="instances"):
        write_lesion_seg(paths[:1], truth, tmp_path / "bad.dcm")
    other = series_truth("MS", 7, slices=2)
    with pytest.raises(ValueError, match="series"):
        write_lesion_seg(paths, other, tmp_path / "bad.dcm")


def test_lesion_seg_passes_dciodvfy(lesion_seg: tuple[list[Path], SeriesTruth, Path],
                                    tmp_path: Path) -> None:
    require(shutil.which("dciodvfy"), "dciodvfy is not on PATH (apt-get install dicom3tools)")
    from tests.integration.test_sc_sr import dciodvfy  # the suite's one dciodvfy runner

    _, _, seg_path = lesion_seg
    mass_paths, mass_truth = write_dicom_series("cSVD", 2, tmp_path / "series",
                                                variant="oblique", slices=3,
                                                shift=Shift(lesions="mass"), truth=True)
    mass_seg = write_lesion_seg(mass_paths, mass_truth, tmp_path / "mass-seg.dcm")
    errors, _ = dciodvfy([seg_path, mass_seg])
    assert errors == []


def test_cli_phantom_writes_the_lesion_seg_beside_the_series(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    out, seg = tmp_path / "series", tmp_path / "truth" / "lesion-seg.dcm"
    assert main(["phantom", "--label", "MS", "--seed", "4", "--slices", "4", "--out", str(out),
                 "--lesion-seg", str(seg), "--lesions", "mass", "--noise-scale", "2",
                 "--fat-scale", "1.25", "--contrast", "t1"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["shift"] == {"noise_scale": 2.0, "fat_scale": 1.25, "contrast": "t1",
                               "lesions": "mass"}
    assert record["lesion_seg"] == str(seg) and record["n_instances"] == 4
    paths = sorted(out.glob("*.dcm"))
    assert [p.name for p in paths] == [f"IM{k:04d}.dcm" for k in range(1, 5)]  # no SEG in it
    shift = Shift(noise_scale=2.0, fat_scale=1.25, contrast="t1", lesions="mass")
    truth = series_truth("MS", 4, slices=4, shift=shift)
    assert record["lesion_voxels"] == int(truth.lesion_mask.sum()) > 0
    assert_seg_matches(seg, paths, truth)
    # the series is the one the Python API writes for the same shift
    direct = write_dicom_series("MS", 4, tmp_path / "direct", slices=4, shift=shift)
    assert [p.read_bytes() for p in direct] == [p.read_bytes() for p in paths]
    # a SEG inside the series folder would be posted with the series: refused
    assert main(["phantom", "--label", "MS", "--slices", "2", "--out", str(tmp_path / "x"),
                 "--lesion-seg", str(tmp_path / "x" / "seg.dcm")]) == 2
    assert "outside" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["phantom", "--label", "MS", "--variant", "sagittal", "--matrix", "64",
                 "--out", str(tmp_path / "y")]) == 2
    assert "axial" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The package, split by job, and its pinned output
# --------------------------------------------------------------------------------------------

# SHA-256 of the generator's output, recorded before service/phantoms was split into modules
# (issue 14) and unchanged by it: the split moved code, it must not move a bit. Written files
# are reproducible (UIDs derive from label and seed, dates are fixed), so their bytes are
# pinned too. Float rendering can differ in the last bit with another numpy, pydicom or
# highdicom, so the pin holds for the versions it was recorded with; after an upgrade that
# legitimately changes the output, print the new values with `python -m tests.unit.test_phantoms`.
PINNED_WITH = {"numpy": "2.4.6", "pydicom": "3.0.2", "highdicom": "0.28.2", "avx512f": True}
PINNED = {
    "axial_ms3": {
        "volume": "45051864e6e38e60e92ac7b75f11afeef355bd8df8743f9e1f966d335f6cdc09",
        "lesion_mask": "bdddaa832c0c2f56a7ecfe49b489e51ce2477b1bc5af564f31158bc1a064b0c0",
        "lesion_sites": "632cb25a4c2077f895c58f50f8d57951ad85449b33f325308448903a084b96ec",
        "brain_mask": "e3fadbc86d05e4582a9a5e9f6f08b3e9d9d2619d6568b0486ecb02ae47dddbde",
        "affine": "9a31c25bd52cb5996c66b4cadf7476fbecfcf218a30c33f369823258d94390e9",
    },
    "axial_csvd8_mass": {
        "volume": "821cc4667e2f65214019abd23f1e8c819bd4d01d6802a2e43d1515b7c5f92b35",
        "lesion_mask": "d80c140d98ad40684369145c9974e7963fed12b50c3d29d78e5806bc6c6906f0",
        "lesion_sites": "22dcd1836b2c2d8b474c68dd91dfa97220a3ca77a0b5db23e4bc8043e6c5e2c8",
        "brain_mask": "35a85ac5d430c17cd83bcb36d65b8679c263ebc690756aed6b7e4a122923cad7",
    },
    "dicom_axial_ms3": {
        "bytes": "54cfa521afa5bf8463679b9a1cce38bd716f598138d0324343e6dda9c3b05c66",
        "pixels": "78b0dbd982a816ab80ed6c4fc7bab7efb4ef4a8d7c360fe14730a646a38065b3",
        "lesion_mask": "bdddaa832c0c2f56a7ecfe49b489e51ce2477b1bc5af564f31158bc1a064b0c0",
        "brain_mask": "e3fadbc86d05e4582a9a5e9f6f08b3e9d9d2619d6568b0486ecb02ae47dddbde",
        "seg_bytes": "52a495ac3ecbb0d8a01a9661277a2927d41c133ca76b28ef815d7488ded70a8a",
    },
    "dicom_axial_csvd1_rle": {
        "bytes": "59f146d7ea913514e5ba827a8ec74a427a8695c8b48f6fd33ef18b46cc1d5bee",
        "pixels": "5f7a57199959934449a09f31a5d1b06b0174757334a984dcaa72a49418bedc96",
    },
    "dicom_sagittal_csvd2": {
        "bytes": "de314bf5b5e2c197398b8fc1dc2c91e32620ae18244c68ab6afeb6531e65924b",
        "pixels": "a65b8bf25c3185c2ea396b103359324a22c9c9a790d3d93e7224a0f31faf8ee1",
        "lesion_mask": "74169ab2edf77b4009ff5069a4f9b5b8eceb8b417e72c451aee25d80b7eae42f",
        "brain_mask": "5f4fa97a05aa657c785f9d932da2fb50740cd691e23456e5b4a9e21beb989f6b",
    },
    "dicom_oblique_ms4": {
        "bytes": "91fd1b40c0c37a918347e905882d09168fb56af5e41a05e7d2667fb0cbf65a33",
        "pixels": "4d52f94dcd8b11a8e24e8df623302681510d4dd834eeb57cf1ef32eba88b339c",
        "lesion_mask": "5235be065eb26e29d2f42b97d9d0dead9106f09e8a5d88ac8fd44468bb1c2272",
        "brain_mask": "c35097b24181d0153bb0097cb836b3bfa6caca731267e00036acc132ce400545",
        "series_truth_lesion": "5235be065eb26e29d2f42b97d9d0dead9106f09e8a5d88ac8fd44468bb1c2272",
    },
    "render_points": {
        "image": "0bd04bdd742c4fae83e6e82d895754842360dd581827f377bbe284a771c0d9d5",
        "mask": "86c050a608dbc531576124b93e6a2a64bfa3efb40f91e68f8271d9ab0cd53e92",
    },
}


def array_sha256(a: np.ndarray) -> str:
    """Of dtype, shape and values: a mask and its float copy, or a reshape, do not collide."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


def files_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def output_hashes(root: Path) -> dict[str, dict[str, str]]:
    """The hashes PINNED holds, computed now (axial, sagittal and oblique series, shifts, a
    compressed series, the lesion SEG and render() at scattered points)."""
    out: dict[str, dict[str, str]] = {}
    for name, label, seed, kwargs in (
            ("axial_ms3", "MS", 3, {"slices": 6}),
            ("axial_csvd8_mass", "cSVD", 8,
             {"slices": 5, "slice_thickness_mm": 3.0, "shift": Shift(lesions="mass")})):
        p = generate_phantom(label, seed, **kwargs)
        out[name] = {key: array_sha256(getattr(p, key)) for key in PINNED[name]}
    for name, label, seed, kwargs in (
            ("dicom_axial_ms3", "MS", 3, {"slices": 6}),
            ("dicom_axial_csvd1_rle", "cSVD", 1, {"slices": 4, "compress": "rle"}),
            ("dicom_sagittal_csvd2", "cSVD", 2, {"variant": "sagittal", "slices": 8}),
            ("dicom_oblique_ms4", "MS", 4,
             {"variant": "oblique", "slices": 4, "shift": Shift(fat_scale=1.25)})):
        paths, truth = write_dicom_series(label, seed, root / name, truth=True, **kwargs)
        got = {"bytes": files_sha256(paths),
               "pixels": array_sha256(np.stack([ds.pixel_array for ds in read(paths)])),
               "lesion_mask": array_sha256(truth.lesion_mask),
               "brain_mask": array_sha256(truth.brain_mask)}
        if name == "dicom_axial_ms3":
            got["seg_bytes"] = files_sha256([write_lesion_seg(paths, truth, root / "seg.dcm")])
        if name == "dicom_oblique_ms4":
            got["series_truth_lesion"] = array_sha256(series_truth(
                label, seed, variant="oblique", slices=4, shift=Shift(fat_scale=1.25)).lesion_mask)
        out[name] = {key: got[key] for key in PINNED[name]}
    points = np.random.default_rng(0).uniform(-100.0, 100.0, size=(5000, 3))
    image, mask = render(make_anatomy("cSVD", 6), points, np.random.default_rng(1))
    out["render_points"] = {"image": array_sha256(image), "mask": array_sha256(mask)}
    return out


def test_output_is_pinned(tmp_path: Path) -> None:
    import highdicom

    # numpy's transcendental functions take other SIMD paths (other last bits) without AVX-512
    cpuinfo = Path("/proc/cpuinfo")
    avx512 = cpuinfo.exists() and " avx512f" in cpuinfo.read_text()
    versions = {"numpy": np.__version__, "pydicom": pydicom.__version__,
                "highdicom": highdicom.__version__, "avx512f": avx512}
    if versions != PINNED_WITH:
        pytest.skip(f"hashes pinned with {PINNED_WITH}, running {versions}")
    assert output_hashes(tmp_path) == PINNED


def test_the_package_is_split_by_job() -> None:
    """Each public name lives in the module of its job, and the package re-exports them all;
    of ours, the generator imports only itself and service.core (import-linter checks the
    same for the whole graph)."""
    import ast

    import service.phantoms as phantoms

    homes = {"anatomy": ["Anatomy", "Band", "Contrast", "Lesion", "Ventricles", "CLASS_NAMES"],
             "lesions": ["make_anatomy"], "shift": ["Shift"],
             "rendering": ["render", "render_with_sites"],
             "geometry": ["PhantomVolume", "SeriesTruth", "generate_phantom", "lesion_slices",
                          "series_truth"],
             "writer": ["write_dicom_series", "write_lesion_seg"]}
    for module, names in homes.items():
        for name in names:
            value = getattr(phantoms, name)
            if callable(value):
                assert value.__module__ == f"service.phantoms.{module}", name
    assert set(phantoms.__all__) <= set(dir(phantoms))
    package = Path(phantoms.__file__).parent
    assert {p.stem for p in package.glob("*.py")} == {"__init__", *homes}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in ("model_export", "torch"), (path.name, name)
                if top == "service":
                    assert name.startswith(("service.phantoms", "service.core")), (path.name, name)


if __name__ == "__main__":  # print the current hashes, to re-pin after a deliberate change
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(output_hashes(Path(tmp)), indent=4))
