"""Ingest: every bad input ends in a typed skip or rejection, never an exception; what can be
decided sensibly (duplicates) goes through with a warning."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.core.codes import Code
from service.core.reading import Instance, Skipped, read_instance
from service.core.series import ingest, ingest_folder
from service.core.volume import SeriesOutcome, load_folder, load_sources
from tests._dicom import encode, encode_all, read_all
from tests.conftest import PhantomFactory

SLICES = 6


@pytest.fixture()
def series(phantom_series: PhantomFactory) -> list[Dataset]:
    """A small axial FLAIR phantom (6 slices, 5 mm), freshly read: tests may mutate it."""
    return read_all(phantom_series("axial", slices=SLICES))


def only(outcomes: list[SeriesOutcome]) -> SeriesOutcome:
    assert len(outcomes) == 1, [o.info.series_instance_uid for o in outcomes]
    return outcomes[0]


def rejection_code(datasets: list[Dataset] | list[bytes]) -> str | None:
    blobs = [d if isinstance(d, bytes) else encode(d) for d in datasets]
    outcomes, skipped = load_sources(blobs)
    assert skipped == []
    outcome = only(outcomes)
    assert (outcome.volume is None) == (outcome.rejection is not None)
    return None if outcome.rejection is None else outcome.rejection.code


def new_instance(ds: Dataset) -> Dataset:
    copied = copy.deepcopy(ds)
    copied.SOPInstanceUID = generate_uid()
    copied.file_meta.MediaStorageSOPInstanceUID = copied.SOPInstanceUID
    return copied


# ------------------------------------------------------------------------ files that are skipped


def test_the_phantom_itself_converts(series: list[Dataset]) -> None:
    assert rejection_code(series) is None


def test_zero_byte_file_and_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for source in (empty, b""):
        outcome = read_instance(source)
        assert isinstance(outcome, Skipped) and outcome.code == Code.EMPTY_FILE


def test_random_bytes_are_not_dicom() -> None:
    rng = np.random.default_rng(0)
    for size in (10, 131, 132, 4096, 200_000):
        outcome = read_instance(rng.bytes(size))
        assert isinstance(outcome, Skipped) and outcome.code == Code.NOT_DICOM, size


def test_png_renamed_dcm_is_not_dicom(tmp_path: Path) -> None:
    ok, png = cv2.imencode(".png", np.zeros((16, 16), np.uint8))
    assert ok
    path = tmp_path / "image.dcm"
    path.write_bytes(png.tobytes())
    outcome = read_instance(path)
    assert isinstance(outcome, Skipped) and outcome.code == Code.NOT_DICOM
    assert "PNG" in outcome.message


def test_truncated_native_file(series: list[Dataset]) -> None:
    data = encode(series[0])
    outcome = read_instance(data[: len(data) // 2])
    assert isinstance(outcome, Skipped) and outcome.code == Code.TRUNCATED
    assert "bytes" in outcome.message


def test_truncated_compressed_file(phantom_series: PhantomFactory) -> None:
    data = (phantom_series("axial", "jpegls", slices=SLICES) / "IM0001.dcm").read_bytes()
    outcome = read_instance(data[: len(data) - 100])
    assert isinstance(outcome, Skipped) and outcome.code == Code.TRUNCATED


def test_file_cut_inside_its_header_is_skipped(series: list[Dataset]) -> None:
    data = encode(series[0])
    for cut in (140, 300, 600, 1000):
        outcome = read_instance(data[:cut])
        assert isinstance(outcome, Skipped), cut
        assert outcome.code in (Code.TRUNCATED, Code.CORRUPT, Code.NO_PIXEL_DATA), outcome


def test_missing_pixel_data(series: list[Dataset]) -> None:
    del series[0].PixelData
    outcome = read_instance(encode(series[0]))
    assert isinstance(outcome, Skipped) and outcome.code == Code.NO_PIXEL_DATA


def test_missing_series_uid(series: list[Dataset]) -> None:
    del series[0].SeriesInstanceUID
    outcome = read_instance(encode(series[0]))
    assert isinstance(outcome, Skipped) and outcome.code == Code.MISSING_UID


def test_dicomdir_is_skipped() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "FLAIRCAD"
    ds.DirectoryRecordSequence = []
    outcome = read_instance(encode(ds))
    assert isinstance(outcome, Skipped) and outcome.code == Code.DICOMDIR


@pytest.mark.parametrize("implicit", [False, True])
def test_files_without_preamble_are_read_with_a_warning(
    series: list[Dataset], implicit: bool
) -> None:
    blobs = []
    for ds in series:
        ds.preamble = None
        del ds.file_meta
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=True)
        assert buffer.getvalue()[128:132] != b"DICM"
        blobs.append(buffer.getvalue())
    outcomes, skipped = load_sources(blobs)
    outcome = only(outcomes)
    assert skipped == [] and outcome.volume is not None, outcome.rejection
    assert [w.code for w in outcome.warnings] == [Code.NO_PREAMBLE]


def test_non_dicom_files_in_a_folder_are_skipped_not_fatal(
    phantom_series: PhantomFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    for path in phantom_series("axial", slices=SLICES).iterdir():
        (folder / "sub" / path.name).write_bytes(path.read_bytes())
    (folder / "README.txt").write_text("not an image")
    (folder / "empty").write_bytes(b"")
    outcomes, skipped = load_folder(folder)
    assert only(outcomes).volume is not None
    assert sorted(s.code for s in skipped) == [Code.EMPTY_FILE, Code.NOT_DICOM]
    assert all(s.source for s in skipped)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the invalid values we made
def test_corrupted_bytes_never_raise(series: list[Dataset]) -> None:
    """Hostile input: bytes flipped all over a valid file, header included."""
    data = bytearray(encode(series[0]))
    rng = np.random.default_rng(1)
    for _ in range(40):
        broken = bytearray(data)
        for offset in rng.integers(0, 2000, size=8):
            broken[offset] = int(rng.integers(0, 256))
        outcomes, skipped = load_sources([bytes(broken), *encode_all(series[1:])])
        assert len(skipped) + sum(o.info.n_instances for o in outcomes) == SLICES


# ------------------------------------------------------------------------- series rejected


def test_missing_image_position(series: list[Dataset]) -> None:
    del series[2].ImagePositionPatient
    assert rejection_code(series) == Code.MISSING_GEOMETRY


def test_malformed_image_orientation(series: list[Dataset]) -> None:
    series[1].ImageOrientationPatient = [1, 0, 0, 0, 1]
    assert rejection_code(series) == Code.MISSING_GEOMETRY


def test_ct_series(series: list[Dataset]) -> None:
    for ds in series:
        ds.Modality = "CT"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    assert rejection_code(series) == Code.NOT_MR


def test_single_slice(series: list[Dataset]) -> None:
    assert rejection_code(series[:1]) == Code.SINGLE_SLICE


def test_inconsistent_rows_columns(series: list[Dataset]) -> None:
    ds = series[3]
    ds.PixelData = ds.pixel_array[:200, :].tobytes()
    ds.Rows = 200
    assert rejection_code(series) == Code.MIXED_MATRIX


def test_mixed_orientation(series: list[Dataset]) -> None:
    series[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal image in an axial series
    assert rejection_code(series) == Code.MIXED_ORIENTATION


def test_mixed_pixel_spacing(series: list[Dataset]) -> None:
    series[0].PixelSpacing = [1.0, 1.0]
    assert rejection_code(series) == Code.MIXED_PIXEL_SPACING


def test_mixed_image_type_magnitude_and_phase(series: list[Dataset]) -> None:
    phase = [new_instance(ds) for ds in series]
    for ds in phase:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
    assert rejection_code(series + phase) == Code.MIXED_IMAGE_TYPE


def test_multi_echo_is_4d(series: list[Dataset]) -> None:
    second = [new_instance(ds) for ds in series]
    for ds in second:
        ds.EchoNumbers = 2
        ds.EchoTime = "200"
    outcomes, _ = load_sources(encode_all(series + second))
    rejection = only(outcomes).rejection
    assert rejection is not None and rejection.code == Code.MULTI_VOLUME_4D
    assert "echo" in rejection.message


def test_repeated_volumes_are_4d(series: list[Dataset]) -> None:
    repeats = []
    for acquisition in (2, 3):
        for ds in series:
            copied = new_instance(ds)
            copied.AcquisitionNumber = acquisition
            repeats.append(copied)
    assert rejection_code(series + repeats) == Code.MULTI_VOLUME_4D


def test_some_slices_acquired_twice_keep_the_newest(series: list[Dataset]) -> None:
    rescan = new_instance(series[2])
    rescan.AcquisitionNumber = 2
    rescan.PixelData = (rescan.pixel_array // 2).tobytes()
    outcomes, _ = load_sources(encode_all([*series, rescan]))
    outcome = only(outcomes)
    volume = outcome.volume
    assert volume is not None, outcome.rejection
    assert [w.code for w in outcome.warnings] == [Code.DUPLICATE_SLICES]
    assert volume.array.shape[0] == SLICES
    kept = [s.sop_instance_uid for s in volume.slices]
    assert rescan.SOPInstanceUID in kept and series[2].SOPInstanceUID not in kept
    k = kept.index(rescan.SOPInstanceUID)
    expected = rescan.pixel_array * float(rescan.RescaleSlope)
    assert np.allclose(volume.array[k], expected, rtol=1e-6)


def test_same_instance_twice_is_one_instance(series: list[Dataset]) -> None:
    blobs = encode_all(series)
    outcomes, _ = load_sources([*blobs, blobs[1]])
    outcome = only(outcomes)
    assert outcome.volume is not None and outcome.volume.array.shape[0] == SLICES
    assert [w.code for w in outcome.warnings] == [Code.DUPLICATE_INSTANCE]


def test_missing_middle_slice(series: list[Dataset]) -> None:
    outcomes, _ = load_sources(encode_all(series[:2] + series[3:]))
    rejection = only(outcomes).rejection
    assert rejection is not None and rejection.code == Code.MISSING_SLICES
    assert rejection.message.startswith("1 slice(s) missing")


def test_non_uniform_spacing(series: list[Dataset]) -> None:
    x, y, z = (float(v) for v in series[3].ImagePositionPatient)
    series[3].ImagePositionPatient = [x, y, z + 1.0]  # 5 mm spacing, one slice 1 mm off
    assert rejection_code(series) == Code.IRREGULAR_SPACING


def test_spacing_jitter_within_tolerance_converts(series: list[Dataset]) -> None:
    x, y, z = (float(v) for v in series[3].ImagePositionPatient)
    series[3].ImagePositionPatient = [x, y, z + 0.02]  # 0.4 % of 5 mm: DS rounding territory
    assert rejection_code(series) is None


def test_sheared_stack(series: list[Dataset]) -> None:
    for k, ds in enumerate(series):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 1.5 * k, z]  # a 17° tilt, like a CT gantry
    assert rejection_code(series) == Code.NON_ORTHOGONAL_STACK


def test_colour_pixels(series: list[Dataset]) -> None:
    for ds in series:
        grey = (ds.pixel_array >> 8).astype(np.uint8)
        ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    assert rejection_code(series) == Code.UNSUPPORTED_PIXELS


def test_classic_multiframe_without_positions(series: list[Dataset]) -> None:
    for ds in series:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
    assert rejection_code(series) == Code.UNSUPPORTED_MULTIFRAME


def test_corrupt_compressed_stream_is_decode_failed(phantom_series: PhantomFactory) -> None:
    datasets = read_all(phantom_series("axial", "jpegls", slices=SLICES))
    frame = next(generate_frames(datasets[2].PixelData, number_of_frames=1))
    datasets[2].PixelData = encapsulate([frame[:40]])
    outcomes, skipped = load_sources(encode_all(datasets))
    rejection = only(outcomes).rejection
    assert skipped == [] and rejection is not None
    assert rejection.code == Code.DECODE_FAILED and "JPEG-LS" in rejection.message


def test_garbage_compressed_stream_is_decode_failed(phantom_series: PhantomFactory) -> None:
    datasets = read_all(phantom_series("axial", "jpegls", slices=SLICES))
    datasets[4].PixelData = encapsulate([b"\x00" * 62 + b"\xff\xd9"])
    assert rejection_code(datasets) == Code.DECODE_FAILED


def test_mosaic_detected_from_the_csa_header_alone(dicom_samples: Path) -> None:
    ds = pydicom.dcmread(dicom_samples / "siemens_trio_epi_mosaic_transfer_syntaxes" / "dicom"
                         / "1.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]  # as some anonymisers leave it
    outcomes, _ = load_sources([encode(ds)])
    rejection = only(outcomes).rejection
    assert rejection is not None and rejection.code == Code.MOSAIC


def _csa2(value: bytes, n_items: int) -> bytes:
    """A Siemens CSA2 header holding one tag, NumberOfImagesInMosaic."""
    def i32(v: int) -> bytes:
        return int(v).to_bytes(4, "little", signed=True)

    head = b"SV10" + b"\x04\x03\x02\x01" + i32(1) + i32(77)
    tag = b"NumberOfImagesInMosaic".ljust(64, b"\x00") + i32(1) + b"US\x00\x00" + i32(3)
    tag += i32(n_items) + i32(77)
    for _ in range(n_items):
        padded = value + b"\x00" * (-len(value) % 4)
        tag += i32(len(value)) + i32(len(value)) + i32(77) + i32(len(value)) + padded
    return head + tag


@pytest.mark.parametrize(("value", "n_items", "mosaic"),
                         [(b"35", 1, True), (b"", 0, False), (b"1", 1, False)])
def test_mosaic_detection_from_a_csa_header(
    series: list[Dataset], value: bytes, n_items: int, mosaic: bool
) -> None:
    """Siemens writes NumberOfImagesInMosaic into non-mosaic CSA headers too, without items."""
    from service.core.series import is_mosaic

    for ds in series:
        ds.Manufacturer = "SIEMENS"
        ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
        ds.add_new((0x0029, 0x1010), "OB", _csa2(value, n_items))
    instance = read_instance(encode(series[0]))
    assert isinstance(instance, Instance)
    assert is_mosaic(instance.dataset) is mosaic
    assert rejection_code(series) == (Code.MOSAIC if mosaic else None)


# ------------------------------------------------------------------------------- grouping


def test_series_are_grouped_by_uid(phantom_series: PhantomFactory, tmp_path: Path) -> None:
    for variant in ("axial", "oblique"):
        for path in phantom_series(variant, slices=SLICES).iterdir():
            (tmp_path / f"{variant}-{path.name}").write_bytes(path.read_bytes())
    ct = read_all(phantom_series("axial", slices=SLICES, label="cSVD"))[:3]
    for k, ds in enumerate(ct):
        ds.Modality = "CT"
        (tmp_path / f"ct{k}.dcm").write_bytes(encode(ds))
    result = ingest_folder(tmp_path)
    assert [s.n_instances for s in result.series] == [SLICES, SLICES, 3]
    assert len({s.series_instance_uid for s in result.series}) == 3
    outcomes, _ = load_folder(tmp_path)
    codes = sorted(str(o.rejection.code) if o.rejection else "ok" for o in outcomes)
    assert codes == ["not_mr", "ok", "ok"]


def test_ingest_accepts_paths_bytes_and_files(series: list[Dataset], tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(encode(series[0]))
    result = ingest([path, encode(series[1]), (io.BytesIO(encode(series[2])), "part-3")])
    assert result.skipped == []
    (group,) = result.series
    assert [i.source for i in group.instances] == [str(path), "<bytes>", "part-3"]


def test_large_private_blobs_are_dropped_but_not_the_csa_image_header(
    series: list[Dataset],
) -> None:
    ds = series[0]
    ds.add_new((0x0021, 0x0010), "LO", "SIEMENS MR SDS 01")
    ds.add_new((0x0021, 0x1019), "OB", b"\x01" * 150_000)  # an XA protocol dump
    ds.add_new((0x0021, 0x1020), "OB", b"\x02" * 100)
    ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
    ds.add_new((0x0029, 0x1010), "OB", b"\x03" * 40_000)
    instance = read_instance(encode(ds))
    assert isinstance(instance, Instance)
    kept = instance.dataset
    assert (0x0021, 0x1019) not in kept
    assert (0x0021, 0x1020) in kept and (0x0029, 0x1010) in kept
    assert kept.PixelData == ds.PixelData
