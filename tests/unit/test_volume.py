"""Series → volume: values, geometry and slice provenance against ground truth (the phantom's
own array and affine, each file's ImagePositionPatient) and against highdicom."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels import pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from service.core.codes import Code
from service.core.preprocess import PreprocessingConfig, preprocess, reorient_to_canonical
from service.core.reading import Instance, read_instance
from service.core.volume import (
    SeriesVolume,
    load_folder,
    load_series_volume,
    load_sources,
    native_frame,
    orientation_code,
)
from service.phantoms import generate_phantom
from tests._dicom import encode, encode_all, read_all
from tests.conftest import PhantomFactory


def volume_of(sources: list[bytes] | Path) -> SeriesVolume:
    outcomes, skipped = load_folder(sources) if isinstance(sources, Path) else load_sources(
        sources)
    assert skipped == [] and len(outcomes) == 1
    assert outcomes[0].volume is not None, outcomes[0].rejection
    return outcomes[0].volume


def test_axial_phantom_equals_its_ground_truth(phantom_series: PhantomFactory) -> None:
    """The DICOM files store round(value / slope); reading them back and reorienting with the
    shared preprocessing gives the phantom's own canonical array and affine."""
    volume = volume_of(phantom_series("axial", slices=12))
    truth = generate_phantom("MS", 1, slices=12)
    canonical = reorient_to_canonical(volume.array, volume.affine_lps)
    slope = float(pydicom.dcmread(phantom_series("axial", slices=12) / "IM0001.dcm").RescaleSlope)
    assert canonical.array.shape == truth.volume.shape
    assert np.abs(canonical.array - truth.volume).max() <= slope / 2 + 1e-3
    assert np.allclose(canonical.affine, truth.affine, atol=1e-6)
    assert volume.orientation == "IPL"  # highdicom stacks axial slices head→foot
    assert orientation_code(canonical.affine) == "SPL"
    assert volume.spacing_mm == (5.0, 0.9375, 0.9375)
    assert volume.array.dtype == np.float32


@pytest.mark.parametrize("variant", ["axial", "sagittal", "oblique"])
def test_affine_reproduces_every_slice_position(
    phantom_series: PhantomFactory, variant: str
) -> None:
    """Slice k's source file (volume.slices[k]) has its ImagePositionPatient exactly where
    the affine puts voxel (k, 0, 0), and its pixels are row k of the array."""
    folder = phantom_series(variant)
    volume = volume_of(folder)
    by_uid = {ds.SOPInstanceUID: ds for ds in read_all(folder)}
    assert sorted(s.sop_instance_uid for s in volume.slices) == sorted(by_uid)
    for k, source in enumerate(volume.slices):
        ds = by_uid[source.sop_instance_uid]
        assert source.frame_number is None and source.instance_number == ds.InstanceNumber
        where = volume.affine_lps @ np.array([k, 0.0, 0.0, 1.0])
        assert np.allclose(where[:3], [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.allclose(volume.array[k], expected, rtol=1e-6, atol=1e-6)
    row = np.array([float(v) for v in by_uid[volume.slices[0].sop_instance_uid]
                    .ImageOrientationPatient[:3]])
    assert np.allclose(volume.affine_lps[:3, 2] / volume.spacing_mm[2], row, atol=1e-6)


def test_volume_plugs_into_the_shared_preprocessing(phantom_series: PhantomFactory) -> None:
    volume = volume_of(phantom_series("sagittal"))
    config = PreprocessingConfig()
    prepared = preprocess(volume.array, volume.affine_lps, config)
    assert prepared.model_input.shape == config.model_grid
    assert orientation_code(prepared.canonical.affine) == "SPL"
    assert volume.orientation == "LIP"  # sagittal: slices R→L, rows head→foot, columns A→P


def test_highdicom_volume_round_trip(phantom_series: PhantomFactory) -> None:
    volume = volume_of(phantom_series("oblique"))
    hd = volume.to_highdicom()
    assert isinstance(hd, highdicom.Volume)
    assert np.array_equal(hd.affine, volume.affine_lps)
    assert hd.spatial_shape == volume.array.shape
    assert np.allclose(hd.spacing, volume.spacing_mm)


def test_enhanced_multiframe_matches_highdicom(dicom_samples: Path) -> None:
    """Our frame table + decode against highdicom's own multi-frame get_volume."""
    folder = dicom_samples / "siemens_xa30_t1w_mprage_enhanced" / "dicom"
    volume = volume_of(folder)
    (path,) = folder.iterdir()
    theirs = highdicom.imread(path).get_volume(dtype=np.float32)
    assert np.array_equal(volume.array, theirs.array)
    assert np.allclose(volume.affine_lps, theirs.affine, atol=1e-6)
    assert sorted(s.frame_number or 0 for s in volume.slices) == list(range(1, 97))
    assert {s.sop_instance_uid for s in volume.slices} == {pydicom.dcmread(
        path, stop_before_pixels=True).SOPInstanceUID}


def test_classic_series_matches_highdicom_get_volume_from_series(
    phantom_series: PhantomFactory,
) -> None:
    folder = phantom_series("oblique")
    volume = volume_of(folder)
    theirs = highdicom.get_volume_from_series(read_all(folder), dtype=np.float32)
    assert np.allclose(volume.array, theirs.array, rtol=1e-6)
    assert np.allclose(volume.affine_lps, theirs.affine, atol=1e-6)


def test_per_slice_rescale(phantom_series: PhantomFactory) -> None:
    """Slope and intercept are applied per image (Philips and GE vary them per slice)."""
    datasets = read_all(phantom_series("axial", slices=6))
    reference = volume_of(encode_all(datasets)).array
    ds = datasets[3]
    slope = float(ds.RescaleSlope)
    ds.PixelData = (ds.pixel_array // 2).tobytes()
    ds.RescaleSlope = f"{2 * slope:.10g}"
    ds.RescaleIntercept = "-7.5"
    volume = volume_of(encode_all(datasets))
    k = [s.sop_instance_uid for s in volume.slices].index(ds.SOPInstanceUID)
    assert np.allclose(volume.array[k], (reference[k] // (2 * slope)) * 2 * slope - 7.5,
                       atol=2 * slope)
    assert np.abs(volume.array[k] + 7.5 - reference[k]).max() <= 2 * slope + 1e-3
    others = [i for i in range(6) if i != k]
    assert np.array_equal(volume.array[others], reference[others])


def test_monochrome1_is_inverted_back(phantom_series: PhantomFactory) -> None:
    datasets = read_all(phantom_series("axial", slices=6))
    reference = volume_of(encode_all(datasets)).array
    for ds in datasets:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = (65535 - ds.pixel_array).astype(np.uint16).tobytes()
    outcomes, _ = load_sources(encode_all(datasets))
    volume = outcomes[0].volume
    assert volume is not None
    assert np.allclose(volume.array, reference, rtol=1e-6, atol=1e-3)
    assert [w.code for w in outcomes[0].warnings] == [Code.MONOCHROME1_INVERTED]


def _with_12_bits(ds: Dataset, signed: bool, rng: np.random.Generator) -> np.ndarray:
    """Store 12-bit values with junk in the unused high bits, as some scanners do."""
    if signed:
        values = rng.integers(-2048, 2048, size=(int(ds.Rows), int(ds.Columns)))
        raw = (values & 0x0FFF) | (rng.integers(0, 16, size=values.shape) << 12)
        ds.PixelRepresentation = 1
    else:
        values = ds.pixel_array.astype(np.int64) >> 4
        raw = values | (rng.integers(0, 16, size=values.shape) << 12)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = raw.astype(np.uint16).tobytes()
    return values


@pytest.mark.parametrize("signed", [False, True])
def test_12_bit_stored_values(phantom_series: PhantomFactory, signed: bool) -> None:
    datasets = read_all(phantom_series("axial", slices=6))
    rng = np.random.default_rng(3)
    truth = {ds.SOPInstanceUID: _with_12_bits(ds, signed, rng) for ds in datasets}
    for ds in datasets:  # the fast native path and pydicom's decoder agree
        instance = read_instance(encode(ds))
        assert isinstance(instance, Instance)
        fast = native_frame(instance.dataset, int(ds.Rows), int(ds.Columns))
        assert fast is not None
        assert np.array_equal(fast, pixel_array(instance.dataset))
        assert np.array_equal(fast, truth[ds.SOPInstanceUID])
    volume = volume_of(encode_all(datasets))
    slope = float(datasets[0].RescaleSlope)
    for k, source in enumerate(volume.slices):
        expected = (truth[source.sop_instance_uid] * slope).astype(np.float32)
        assert np.allclose(volume.array[k], expected, rtol=1e-6)


def _rewritten(datasets: list[Dataset], syntax: str) -> list[bytes]:
    blobs = []
    for ds in datasets:
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        if syntax == ExplicitVRBigEndian:
            ds.PixelData = pixels.astype(">u2").tobytes()
            dcmwrite(buffer, ds, force_encoding=True, little_endian=False, implicit_vr=False)
        else:
            dcmwrite(buffer, ds, enforce_file_format=True)
        blobs.append(buffer.getvalue())
    return blobs


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_uncompressed_transfer_syntaxes(phantom_series: PhantomFactory, syntax: str) -> None:
    folder = phantom_series("axial", slices=6)
    reference = volume_of(folder)
    volume = volume_of(_rewritten(read_all(folder), syntax))
    assert volume.info.transfer_syntaxes == (str(syntax),)
    assert np.array_equal(volume.array, reference.array)
    assert np.array_equal(volume.affine_lps, reference.affine_lps)


@pytest.mark.parametrize("compress", ["jpegls", "jpeg2000", "rle"])
def test_lossless_codecs_give_the_uncompressed_volume(
    phantom_series: PhantomFactory, compress: str
) -> None:
    reference = volume_of(phantom_series("axial", slices=6))
    volume = volume_of(phantom_series("axial", compress, slices=6))
    assert np.array_equal(volume.array, reference.array)


def test_fragmented_jpeg_lossless_sample_equals_uncompressed_decode(dicom_samples: Path) -> None:
    """Every frame of the gdcm-recompressed sample is split over several fragments."""
    folder = dicom_samples / "siemens_xa30_t1w_mprage_jpeglossless" / "dicom"
    volume = volume_of(folder)
    first = pydicom.dcmread(folder / Path(volume.slices[0].source).name)
    assert np.array_equal(volume.array[0], first.pixel_array.astype(np.float32))
    assert volume.array.shape == (96, 128, 128)


def test_load_series_volume_refuses_ambiguous_folders(
    phantom_series: PhantomFactory, tmp_path: Path
) -> None:
    volume = load_series_volume(phantom_series("axial", slices=6))
    assert volume.array.shape == (6, 256, 256)
    for variant in ("axial", "oblique"):
        for path in phantom_series(variant, slices=6).iterdir():
            (tmp_path / f"{variant}{path.name}").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="expected one convertible series, found 2"):
        load_series_volume(tmp_path)


def test_training_reads_dicom_through_the_service(
    phantom_series: PhantomFactory, tmp_path: Path
) -> None:
    """model_export's cohort loader uses this reader for DICOM folders: one implementation."""
    from model_export.data import load_volume, read_index

    folder = phantom_series("axial", slices=12)
    array, affine = load_volume(folder)
    volume = load_series_volume(folder)
    assert np.array_equal(array, volume.array) and np.array_equal(affine, volume.affine_lps)
    index = tmp_path / "cohort.csv"
    index.write_text(f"path,label,patient_id\n{folder},MS,P1\n")
    (sample,) = read_index(index, PreprocessingConfig(target_shape=(64, 64, 8)))
    assert sample.volume.shape == (8, 64, 64) and sample.label == 0
