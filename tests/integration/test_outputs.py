"""FLAIRCAD_OUTPUTS: any subset of the DICOM outputs is produced, written and listed, and
nothing else (a PACS that refuses a SOP class is sent only what it takes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.config import Settings
from service.core.outputs import ALL_OUTPUTS, DicomOutput, parse_outputs
from service.core.reading import iter_folder
from service.intake.uploads import fingerprint
from service.pipeline.analysis import analyse
from service.storage.results import ResultFolder, write_outputs
from tests.conftest import PhantomFactory
from tests.integration.test_sc_sr import FakeEngine


def test_outputs_setting_reads_lists_and_refuses_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().outputs == ALL_OUTPUTS
    monkeypatch.setenv("FLAIRCAD_OUTPUTS", " SR, pm ")
    assert Settings().outputs == {DicomOutput.SR, DicomOutput.PM}
    monkeypatch.setenv("FLAIRCAD_OUTPUTS", '["sc"]')
    assert Settings().outputs == {DicomOutput.SC}
    for wrong in ("sr,seg", "", " , "):
        with pytest.raises(ValueError):
            parse_outputs(wrong)


def test_another_choice_of_outputs_is_another_upload_identity() -> None:
    parts = ["a" * 64, "b" * 64]
    assert fingerprint("m", "1", "hirescam", parts, ["sr"]) != \
        fingerprint("m", "1", "hirescam", parts, ["sc", "sr"])
    assert fingerprint("m", "1", "hirescam", parts, ["sr", "sc"]) == \
        fingerprint("m", "1", "hirescam", parts, ["sc", "sr"])


def test_sr_only_analysis_writes_and_lists_the_sr_alone(phantom_series: PhantomFactory,
                                                         tmp_path: Path) -> None:
    analysis = analyse(iter_folder(phantom_series()), FakeEngine(), outputs={DicomOutput.SR})
    assert analysis.sc_instances == [] and analysis.sc_series_instance_uid is None
    assert analysis.sr_instance is not None and analysis.instances() == [analysis.sr_instance]
    report = analysis.sr_dataset()
    # the report rests on the source images only: no SC was made to reference
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [str(s.SeriesInstanceUID) for s in evidence] == [analysis.series_instance_uid]
    written = write_outputs(analysis, tmp_path)
    assert written["sc"] == [] and written["pm"] is None and written["sr"].is_file()
    assert ResultFolder(tmp_path).dicom_files() == [tmp_path / "sr.dcm"]
    assert analysis.to_json()["outputs"]["secondary_capture_series_instance_uid"] is None


def test_sc_only_analysis_has_no_sr(phantom_series: PhantomFactory, tmp_path: Path) -> None:
    analysis = analyse(iter_folder(phantom_series()), FakeEngine(), outputs=["sc"])
    assert len(analysis.sc_instances) == 24 and analysis.sr_instance is None
    with pytest.raises(LookupError):
        analysis.sr_dataset()
    write_outputs(analysis, tmp_path)
    assert [p.name for p in ResultFolder(tmp_path).dicom_files()] == \
        [f"IM{n:04d}.dcm" for n in range(1, 25)]
    with pytest.raises(ValueError, match="at least one"):
        analyse(iter_folder(phantom_series()), FakeEngine(), outputs=())


def test_the_default_outputs_include_the_parametric_map_on_the_source_geometry(
        phantom_series: PhantomFactory, tmp_path: Path) -> None:
    analysis = analyse(iter_folder(phantom_series()), FakeEngine())
    assert analysis.pm_instance is not None
    parametric_map = analysis.pm_dataset()
    sources = analysis.sc_datasets()  # SC i lies on source slice i (InstanceNumber order)
    assert parametric_map.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert int(parametric_map.NumberOfFrames) == len(sources) == 24
    assert parametric_map.SeriesInstanceUID == analysis.pm_series_instance_uid
    assert parametric_map.SOPInstanceUID == analysis.pm_sop_instance_uid
    assert parametric_map.StudyInstanceUID == analysis.study_instance_uid
    assert int(parametric_map.SeriesNumber) % 1000 == int(sources[0].SeriesNumber) % 1000
    assert analysis.instances() == [*analysis.sc_instances, analysis.pm_instance,
                                    analysis.sr_instance]
    written = write_outputs(analysis, tmp_path)
    assert written["pm"] == tmp_path / "pm.dcm"
    assert ResultFolder(tmp_path).dicom_files()[-2:] == [tmp_path / "pm.dcm", tmp_path / "sr.dcm"]
    outputs = analysis.to_json()["outputs"]
    assert outputs["parametric_map_sop_instance_uid"] == analysis.pm_sop_instance_uid


def test_a_series_without_frame_of_reference_gets_no_map_but_its_other_outputs(
        phantom_series: PhantomFactory, tmp_path: Path) -> None:
    from pydicom import dcmread

    folder = tmp_path / "no-frame-of-reference"  # a copy: the phantom folder is shared
    folder.mkdir()
    for path in sorted(phantom_series().glob("*.dcm")):
        ds = dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(folder / path.name)
    analysis = analyse(iter_folder(folder), FakeEngine())
    assert analysis.pm_instance is None and analysis.pm_sop_instance_uid is None
    assert len(analysis.sc_instances) == 24 and analysis.sr_instance is not None
    assert any(w.startswith("no Parametric Map:") for w in analysis.warnings)
