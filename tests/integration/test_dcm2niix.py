"""Our volumes against dcm2niix: the stored references of real scanner data in
``../shared/dicom-samples`` and live dcm2niix runs on phantom series of every variant.

Comparisons bring both sides to nibabel's closest canonical (RAS+) orientation, then demand the
same shape, voxel values equal up to the rescale's float rounding, and the same geometry
(voxel sizes within 1e-3 mm, axes within 1e-4 rad; see ``tests/_dicom.assert_same_geometry``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.core.codes import Code
from service.core.volume import load_folder, load_sources
from tests._dicom import assert_matches_reference, reference
from tests.conftest import PhantomFactory

# Every folder of ../shared/dicom-samples and what must happen to it: None = converts.
SAMPLES: dict[str, str | None] = {
    "siemens_xa30_t1w_mprage_enhanced": None,
    "siemens_xa30_t1w_mprage_jpeglossless": None,
    "ge_mr750_epi_fmri_4d": Code.MULTI_VOLUME_4D,
    "philips_achieva_epi_fmri_oblique": Code.MULTI_VOLUME_4D,
    "siemens_trio_epi_mosaic_transfer_syntaxes": Code.MOSAIC,
}


def test_every_sample_folder_has_an_expectation(dicom_samples: Path) -> None:
    folders = {p.name for p in dicom_samples.iterdir() if p.is_dir()}
    assert folders == set(SAMPLES), "a sample folder was added or removed: update SAMPLES"


@pytest.mark.parametrize("name", [n for n, code in SAMPLES.items() if code is None])
def test_converted_sample_equals_dcm2niix_reference(dicom_samples: Path, name: str) -> None:
    outcomes, skipped = load_folder(dicom_samples / name / "dicom")
    assert skipped == []
    assert len(outcomes) == 1 and outcomes[0].rejection is None, outcomes[0].rejection
    volume = outcomes[0].volume
    assert volume is not None
    (ref,) = sorted((dicom_samples / name / "ref").glob("*.nii"))
    result = assert_matches_reference(volume, ref)
    assert result["max_abs_diff"] == 0.0  # slope 1: integers, exactly


@pytest.mark.parametrize("name", [n for n, code in SAMPLES.items() if code is not None])
def test_rejected_sample_has_the_right_code(dicom_samples: Path, name: str) -> None:
    outcomes, skipped = load_folder(dicom_samples / name / "dicom")
    assert skipped == []
    assert [o.rejection.code if o.rejection else None for o in outcomes] == [SAMPLES[name]]
    assert outcomes[0].volume is None and outcomes[0].rejection is not None
    assert outcomes[0].rejection.message  # a human reason, not just a code


def _split_by_time(folder: Path, key: str) -> dict[int, list[Path]]:
    groups: dict[int, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # GE numbers the 150 images slice-fastest: 15 per volume
        t = int(ds.TemporalPositionIdentifier) - 1 if key == "temporal" else (
            (int(ds.InstanceNumber) - 1) // 15)
        groups.setdefault(t, []).append(path)
    return groups


@pytest.mark.parametrize(
    ("name", "key", "stored_units"),
    [("ge_mr750_epi_fmri_4d", "instance", False),
     ("philips_achieva_epi_fmri_oblique", "temporal", True)],
)
def test_each_time_point_of_a_4d_sample_equals_the_reference_volume(
    dicom_samples: Path, name: str, key: str, stored_units: bool
) -> None:
    """The 4D series are rejected as a whole; one time point's files alone are a 3D volume,
    which must equal dcm2niix's 4D reference at that time point (oblique Philips geometry, GE
    slice gaps). Philips: compared in stored integers (see assert_matches_reference)."""
    groups = _split_by_time(dicom_samples / name / "dicom", key)
    (ref,) = sorted((dicom_samples / name / "ref").glob("*.nii"))
    for t in (min(groups), max(groups)):
        outcomes, _ = load_sources(groups[t])
        volume = outcomes[0].volume
        assert volume is not None, outcomes[0].rejection
        slope = float(pydicom.dcmread(groups[t][0]).get("RescaleSlope") or 1.0)
        assert_matches_reference(volume, ref, time_point=t,
                                 our_slope=slope if stored_units else None)


def _tiles(mosaic: np.ndarray, n: int, size: int) -> np.ndarray:
    per_row = mosaic.shape[1] // size
    return np.stack([mosaic[(k // per_row) * size:(k // per_row + 1) * size,
                            (k % per_row) * size:(k % per_row + 1) * size] for k in range(n)])


def test_mosaic_in_nine_transfer_syntaxes_rejected_and_decodes_like_dcm2niix(
    dicom_samples: Path,
) -> None:
    """Each of the 9 files alone is rejected as a mosaic; and its pixels, decoded by the same
    codecs the volume path uses (implicit/explicit LE, explicit big endian, RLE, JPEG Lossless
    SV1 ×2, JPEG-LS ×2, JPEG 2000), equal dcm2niix's reference tile by tile."""
    folder = dicom_samples / "siemens_trio_epi_mosaic_transfer_syntaxes"
    syntaxes = set()
    for k in range(1, 10):
        path = folder / "dicom" / f"{k}.dcm"
        outcomes, skipped = load_sources([path])
        assert skipped == [] and len(outcomes) == 1
        assert outcomes[0].rejection is not None and outcomes[0].rejection.code == Code.MOSAIC
        syntaxes.update(outcomes[0].info.transfer_syntaxes)
        ds = pydicom.dcmread(path)
        ref, _, _ = reference(folder / "ref" / f"{k}.nii")
        tiles = _tiles(ds.pixel_array, ref.shape[2], ref.shape[0])
        # dcm2niix: i = tile column, j = tile row from the bottom
        assert np.array_equal(np.transpose(tiles, (2, 1, 0))[:, ::-1, :], ref), k
    assert len(syntaxes) == 7  # 5 and 6 share JPEG Lossless SV1, 7 and 8 JPEG-LS lossless


LIVE_VARIANTS = [
    ("axial", None), ("sagittal", None), ("oblique", None),
    ("axial", "jpegls"), ("axial", "jpeg2000"), ("axial", "rle"),
]


def _run_dcm2niix(dcm2niix: str, folder: Path, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([dcm2niix, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out),
                           str(folder)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("variant", "compress"), LIVE_VARIANTS)
def test_phantom_series_equals_live_dcm2niix(
    dcm2niix: str, phantom_series: PhantomFactory, tmp_path: Path, variant: str,
    compress: str | None,
) -> None:
    """dcm2niix converts the same phantom series and we agree with it. Debian's dcm2niix has
    no JPEG-LS decoder (it says "Unsupported transfer syntax"); the compressions are lossless,
    so a codec it lacks is checked against its conversion of the uncompressed series."""
    folder = phantom_series(variant, compress)
    result = _run_dcm2niix(dcm2niix, folder, tmp_path / "ref")
    ref = tmp_path / "ref" / "ref.nii"
    if not ref.is_file():
        assert compress is not None, result.stdout + result.stderr
        assert "Unsupported transfer syntax" in result.stdout + result.stderr
        result = _run_dcm2niix(dcm2niix, phantom_series(variant, None), tmp_path / "plain")
        ref = tmp_path / "plain" / "ref.nii"
    assert ref.is_file(), result.stdout + result.stderr
    outcomes, skipped = load_folder(folder)
    assert skipped == [] and len(outcomes) == 1
    volume = outcomes[0].volume
    assert volume is not None, outcomes[0].rejection
    assert_matches_reference(volume, ref)
