"""The synthetic FLAIR phantoms: ground truth, class-defining properties, DICOM fidelity."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from model_export.phantoms import (
    CLASS_NAMES,
    COMPRESSIONS,
    PhantomVolume,
    _noise_rng,
    generate_phantom,
    lesion_slices,
    make_anatomy,
    render,
    write_dicom_series,
)
from service.preprocess import reorient_to_canonical

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
