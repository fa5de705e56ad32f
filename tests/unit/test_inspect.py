"""``flaircad inspect``: JSON Lines per series, NIfTI output, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from service.cli import main
from service.core.volume import load_folder
from tests._dicom import encode, read_all
from tests.conftest import PhantomFactory

FIELDS = {
    "series_instance_uid", "series_description", "modality", "is_flair", "flair_rule", "shape",
    "spacing_mm", "affine_ras", "orientation", "transfer_syntaxes", "n_instances", "warnings",
    "nifti_path", "rejection",
}
FLAIRCAD = Path(sys.executable).with_name("flaircad")


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]],
                                                                       str]:
    code = main(["inspect", *args])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_one_series_converts_and_writes_nifti(
    phantom_series: PhantomFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = phantom_series("oblique")
    code, records, _ = inspect(capsys, str(folder), "--nifti-dir", str(tmp_path / "nii"))
    assert code == 0
    (record,) = records
    assert set(record) == FIELDS
    assert record["modality"] == "MR" and record["series_description"] == "AX T2 FLAIR OBL"
    assert record["is_flair"] is True and record["flair_rule"] == "flair_by_name"
    assert record["rejection"] is None and record["warnings"] == []
    assert record["n_instances"] == 24 and record["transfer_syntaxes"] == ["1.2.840.10008.1.2.1"]
    assert record["shape"] == [256, 256, 24]
    assert record["spacing_mm"] == pytest.approx([0.9375, 0.9375, 5.0], abs=1e-4)

    path = Path(record["nifti_path"])
    assert path == tmp_path / "nii" / f"{record['series_instance_uid']}.nii.gz"
    image = nib.load(path)
    assert list(image.shape) == record["shape"]
    assert np.allclose(image.affine, record["affine_ras"], atol=1e-4)
    assert "".join(nib.aff2axcodes(image.affine)) == record["orientation"]
    assert np.allclose(image.header.get_zooms(), record["spacing_mm"], atol=1e-5)
    # the NIfTI holds the volume, voxel for voxel, in the order shape/affine_ras describe
    (outcome,), _ = load_folder(folder)
    assert outcome.volume is not None
    data = np.asarray(image.dataobj, dtype=np.float32)
    assert np.allclose(data, np.transpose(outcome.volume.array, (2, 1, 0)), rtol=1e-6)
    # (i, j, k) = (column, row, slice): voxel (0, 0, k) is slice k's ImagePositionPatient
    first = outcome.volume.slices[0]
    ds = next(d for d in read_all(folder) if d.SOPInstanceUID == first.sop_instance_uid)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(record["affine_ras"]) @ [0, 0, 0, 1]
    assert np.allclose(lps[:3], [float(v) for v in ds.ImagePositionPatient], atol=1e-4)


def test_rejections_and_skips_give_exit_3(
    phantom_series: PhantomFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in phantom_series("axial", slices=6).iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    for k, ds in enumerate(read_all(phantom_series("axial", slices=6, label="cSVD"))[:2]):
        ds.Modality = "CT"
        (tmp_path / f"ct{k}.dcm").write_bytes(encode(ds))
    (tmp_path / "notes.txt").write_text("hello")
    code, records, err = inspect(capsys, str(tmp_path))
    assert code == 3
    codes = sorted(r["rejection"]["code"] if r["rejection"] else "converted" for r in records)
    assert codes == ["converted", "not_mr"]
    rejected = next(r for r in records if r["rejection"])
    assert set(rejected) == FIELDS
    assert rejected["shape"] is None and rejected["affine_ras"] is None
    assert rejected["nifti_path"] is None and rejected["n_instances"] == 2
    assert "notes.txt: not_dicom" in err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    bad_rules = tmp_path / "rules.json"
    bad_rules.write_text("{not json")
    assert main(["inspect", str(tmp_path), "--rules", str(bad_rules)]) == 2
    assert "FLAIR rules" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["inspect"])
    assert exited.value.code == 2


def test_empty_folder_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, records, err = inspect(capsys, str(tmp_path))
    assert code == 3 and records == [] and "no DICOM image series" in err


def test_custom_rules_change_is_flair(
    phantom_series: PhantomFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"version": 1, "rules": [
        {"name": "only_sagittal", "when": {"attribute": "SeriesDescription", "regex": "^SAG"}}]}))
    _, records, _ = inspect(capsys, str(phantom_series("axial", slices=6)), "--rules", str(rules))
    assert records[0]["is_flair"] is False and records[0]["flair_rule"] is None


def test_console_script_over_all_dicom_samples(dicom_samples: Path, tmp_path: Path) -> None:
    """Acceptance: inspect every sample folder at once, as a user would."""
    assert FLAIRCAD.is_file(), "the flaircad console script is not installed (pip install -e .)"
    result = subprocess.run([str(FLAIRCAD), "inspect", str(dicom_samples), "--nifti-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    codes = sorted((r["series_description"], r["rejection"]["code"] if r["rejection"] else None)
                   for r in records)
    assert codes == [
        ("Axial EPI-FMRI (Interleaved I to S)", "multi_volume_4d"),
        ("EPI_asc", "multi_volume_4d"),
        ("anat-T1w_acq-tfl", None),
        ("anat-T1w_acq-tfl", None),
        ("ax_asc_35sl", "mosaic"),
    ]
    assert all(not r["is_flair"] for r in records)
    converted = [r for r in records if r["rejection"] is None]
    assert all(Path(r["nifti_path"]).is_file() and r["shape"] == [128, 128, 96]
               for r in converted)
    # the ref/ folders' NIfTI and JSON files are reported as skipped, not fatal
    assert "ref/1.nii: not_dicom" in result.stderr
