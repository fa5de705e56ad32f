"""The DICOM outputs: Secondary Capture overlays and the Comprehensive SR.

Checked three ways: against the source files themselves (each SC references the right source
image, with its Rows/Columns, and a hot map cell shows at its patient position in it),
against the standard with ``dciodvfy`` (0 errors, every variant), and with pydicom reading the
outputs back under strict validation. Sanitising is tested on a series whose headers carry the
usual scanner defects.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import validate_value

from service.core.config import BUNDLED_MODEL
from service.core.contract import EXPLANATIONS, Calibration, DistributionCheck
from service.core.preprocess import PreprocessingConfig, reorient_to_canonical
from service.core.reading import iter_folder
from service.core.volume import load_series_volume
from service.pipeline.analysis import Analysis, analyse
from service.pipeline.engine import Engine, EngineOutput, ModelInfo
from service.pipeline.overlay import colour_bar_box
from service.storage.results import write_outputs
from tests.conftest import PhantomFactory, require

CAM_GRID = (24, 16, 16)


OOD_THRESHOLD = 5.0


class FakeEngine:
    """Stands in for the ONNX engine: returns the maps, weights and score it is given.
    ``cam`` is both CAMs (HiResCAM and Grad-CAM) unless ``hirescam``/``gradcam`` say otherwise;
    ``spatial_attention`` (S, 16, 16) defaults to uniform, the slice weights are uniform."""

    provider = "FakeExecutionProvider"

    def __init__(self, cam: np.ndarray | None = None,
                 probabilities: tuple[float, float] = (0.8, 0.2), *,
                 hirescam: np.ndarray | None = None, gradcam: np.ndarray | None = None,
                 spatial_attention: np.ndarray | None = None, ood_score: float = 1.0,
                 temperature: float = 1.5) -> None:
        self.info = ModelInfo(
            name="fake-model", version="9.9", class_names=("MS", "cSVD"),
            preprocessing=PreprocessingConfig(), architecture={}, training_summary={},
            intended_use="tests", source_checkpoint_sha256="0" * 64,
            calibration=Calibration(temperature, "validation"),
            distribution=DistributionCheck("mahalanobis", OOD_THRESHOLD))
        zeros = np.zeros(CAM_GRID, np.float32)
        cam = zeros if cam is None else cam
        self.hirescam = cam if hirescam is None else hirescam
        self.gradcam = cam if gradcam is None else gradcam
        self.spatial_attention = spatial_attention
        self.ood_score = np.array([ood_score], dtype=np.float32)
        self.probabilities = np.array([probabilities], dtype=np.float32)

    def run(self, volumes: np.ndarray, target_class: np.ndarray | None = None) -> EngineOutput:
        assert volumes.shape == (1, *PreprocessingConfig().model_grid)
        slices = volumes.shape[1]
        attention = (np.full((slices, 16, 16), 1.0 / 256, np.float32)
                     if self.spatial_attention is None else self.spatial_attention)
        return EngineOutput(
            probabilities=self.probabilities, logits=np.log(self.probabilities),
            slice_weights=np.full((1, slices), 1.0 / slices, np.float32),
            spatial_attention=attention[None], gradcam=self.gradcam[None],
            hirescam=self.hirescam[None], ood_score=self.ood_score)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(BUNDLED_MODEL, ["CPUExecutionProvider"])


def _sources(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in
            (pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm")))}


@contextmanager
def _strict_pydicom() -> Iterator[None]:
    """pydicom raising, not warning, on values its VR does not allow (some checks raise in
    RAISE mode, others only ever warn: both become errors)."""
    settings = pydicom_config.settings
    saved = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        settings.reading_validation_mode = saved


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI",
             "UC", "UR", "UT"}


def _read_strictly(data: bytes) -> Dataset:
    """Read an output and validate every value against its VR (pydicom checks lengths when
    reading, characters and formats only when a value is assigned: do both here)."""
    with _strict_pydicom():
        ds = pydicom.dcmread(io.BytesIO(data))
        for element in ds.iterall():
            if element.VR not in _TEXT_VRS or element.value is None:
                continue
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            for value in values:
                validate_value(element.VR, str(value), pydicom_config.RAISE)
    return ds


def dciodvfy(paths: list[Path]) -> tuple[list[str], set[str]]:
    """Run dciodvfy on each file: (error lines, distinct warning lines)."""
    binary = shutil.which("dciodvfy")
    require(binary, "dciodvfy is not on PATH (apt-get install dicom3tools)")
    assert binary is not None
    errors: list[str] = []
    seen: set[str] = set()
    for path in paths:
        result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
        for line in (result.stdout + result.stderr).splitlines():
            if line.startswith("Error"):
                errors.append(f"{path.name}: {line}")
            elif line.startswith("Warning"):
                seen.add(line)
    return errors, seen


# --------------------------------------------------------------------------------------------
# Against the source files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["axial", "sagittal", "oblique"])
def test_overlay_hot_spot_is_at_its_patient_position_in_the_referenced_image(
        phantom_series: PhantomFactory, variant: str) -> None:
    """A hot cell on the CAM grid must show up in the SC instance whose *referenced source
    file* (its own ImagePositionPatient / ImageOrientationPatient / PixelSpacing) puts the
    colour where the cell is in the patient."""
    folder = phantom_series(variant=variant)
    cell = (12, 8, 7)
    cam = np.zeros(CAM_GRID, np.float32)
    cam[cell] = 1.0
    analysis = analyse(iter_folder(folder), FakeEngine(cam))
    volume = load_series_volume(folder)
    canonical = reorient_to_canonical(volume.array, volume.affine_lps)
    centre = [(c + 0.5) * n / g - 0.5
              for c, n, g in zip(cell, canonical.array.shape, CAM_GRID, strict=True)]
    expected = (canonical.affine @ np.array([*centre, 1.0]))[:3]

    sources = _sources(folder)
    captures = analysis.sc_datasets()

    def chroma(ds: Dataset) -> np.ndarray:
        rgb = ds.pixel_array.astype(np.int32)
        out = rgb.max(axis=2) - rgb.min(axis=2)
        out[int(0.85 * out.shape[0]):] = 0  # the yellow research notice
        bar = colour_bar_box(*out.shape)  # the JET legend at the right edge: not the map
        out[bar.top:bar.bottom, bar.left:bar.right] = 0
        return out

    hottest = max(captures, key=lambda ds: int(chroma(ds).sum()))
    weight = chroma(hottest).astype(np.float64)
    rows, cols = np.indices(weight.shape)
    r, c = (rows * weight).sum() / weight.sum(), (cols * weight).sum() / weight.sum()
    source = sources[hottest.SourceImageSequence[0].ReferencedSOPInstanceUID]
    iop = np.array(source.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in source.PixelSpacing)
    found = (np.array(source.ImagePositionPatient, dtype=np.float64)
             + c * col_spacing * iop[:3] + r * row_spacing * iop[3:])
    slice_spacing = float(source.SpacingBetweenSlices)
    assert np.linalg.norm(found - expected) <= 0.5 * slice_spacing + 1.5, (found, expected)
    # and the grey image under the colour is that source image, the right way round
    grey = hottest.pixel_array[..., 0].astype(np.float64)
    keep = (chroma(hottest) == 0)
    keep[: int(0.25 * keep.shape[0])] = False  # the result banner
    keep[int(0.85 * keep.shape[0]):] = False
    keep[:, int(0.9 * keep.shape[1]):] = False  # the colour bar and its labels
    correlation = np.corrcoef(grey[keep], source.pixel_array.astype(np.float64)[keep])[0, 1]
    assert correlation > 0.98


def test_secondary_capture_series_attributes(phantom_series: PhantomFactory) -> None:
    folder = phantom_series(variant="sagittal")  # volume order ≠ InstanceNumber order here
    analysis = analyse(iter_folder(folder), FakeEngine())
    sources = _sources(folder)
    first_source = next(iter(sources.values()))
    captures = [_read_strictly(data) for data in analysis.sc_instances]
    assert len(captures) == len(sources) == len(analysis.slice_weights)
    assert analysis.slice_weights == pytest.approx([1 / len(sources)] * len(sources))
    referenced_numbers = []
    sop_uids = set()
    for number, ds in enumerate(captures, start=1):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
        assert ds.Modality == "OT" and ds.InstanceNumber == number
        assert ds.StudyInstanceUID == first_source.StudyInstanceUID
        assert ds.SeriesInstanceUID == analysis.sc_series_instance_uid
        assert ds.SeriesInstanceUID != first_source.SeriesInstanceUID
        assert ds.SOPInstanceUID == analysis.sc_sop_instance_uids[number - 1]
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.PatientID == first_source.PatientID
        assert ds.PatientName == first_source.PatientName
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.ConversionType == "WSD" and ds.BurnedInAnnotation == "YES"
        assert ds.SeriesDescription == "flaircad HiResCAM MS - RESEARCH ONLY"
        assert "RESEARCH USE ONLY" in ds.ImageComments
        assert "Within the training distribution" in ds.ImageComments
        assert "HiResCAM" in ds.DerivationDescription and "fake-model" in ds.DerivationDescription
        equipment = {(e.Manufacturer, e.get("ManufacturerModelName"), e.get("SoftwareVersions"))
                     for e in ds.ContributingEquipmentSequence}
        assert ("flaircad", "fake-model", "9.9") in equipment
        reference = ds.SourceImageSequence[0]
        source = sources[reference.ReferencedSOPInstanceUID]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        assert ds.pixel_array.shape == (source.Rows, source.Columns, 3)
        referenced_numbers.append(int(source.InstanceNumber))
    assert referenced_numbers == sorted(referenced_numbers)  # source reading order
    assert len(set(referenced_numbers)) == len(sources) and len(sop_uids) == len(sources)


def test_structured_report_content(phantom_series: PhantomFactory) -> None:
    folder = phantom_series(variant="axial")
    analysis = analyse(iter_folder(folder), FakeEngine(probabilities=(0.25, 0.75)))
    assert analysis.prediction == "cSVD"
    raw = _read_strictly(analysis.sr_instance)
    assert raw.SOPInstanceUID == analysis.sr_sop_instance_uid
    assert "RESEARCH" in raw.SeriesDescription
    report = highdicom.sr.Comprehensive3DSR.from_dataset(raw)
    sources = _sources(folder)
    evidence = {uid for _, _, uid, _ in report.get_evidence()}
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert evidence == (set(sources) | set(analysis.sc_sop_instance_uids)
                        | {analysis.pm_sop_instance_uid})
    assert {series for _, series in report.get_evidence_series()} == {
        next(iter(sources.values())).SeriesInstanceUID, analysis.sc_series_instance_uid,
        analysis.pm_series_instance_uid}
    assert raw.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    assert {item.CodingSchemeDesignator for item in raw.CodingSchemeIdentificationSequence} \
        == {"99FLAIRCAD"}

    content = highdicom.sr.MeasurementReport.from_sequence(report.content)
    (group,) = content.get_image_measurement_groups()
    for name, value in ((codes.DCM.AlgorithmName, "fake-model"),
                        (codes.DCM.AlgorithmVersion, "9.9")):
        items = find_content_items(raw, name=name, recursive=True)
        assert items and {item.TextValue for item in items} == {value}
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured == pytest.approx({"Probability of MS (model output)": 0.25,
                                      "Probability of cSVD (model output)": 0.75,
                                      "Out-of-distribution score (model output)": 1.0},
                                     abs=1e-6)
    assert all(m.unit.value == "1" and m.unit.scheme_designator == "UCUM"
               for m in group.get_measurements())
    evaluation, input_series, distribution = group.get_qualitative_evaluations()
    assert input_series.name.meaning == "Input series assessment"
    assert input_series.value.meaning == "Recognised as T2-FLAIR"
    assert evaluation.name.meaning == "Predicted class (research model)"
    assert (evaluation.value.value, evaluation.value.scheme_designator) == ("CSVD", "99FLAIRCAD")
    assert distribution.name.meaning == "Training distribution assessment"
    assert distribution.value.meaning == "Within training distribution"
    assert "RESEARCH USE ONLY" in group.tracking_identifier

    ms = analyse(iter_folder(folder), FakeEngine(probabilities=(0.9, 0.1)))
    ms_report = highdicom.sr.Comprehensive3DSR.from_dataset(ms.sr_dataset())
    (ms_group,) = highdicom.sr.MeasurementReport.from_sequence(
        ms_report.content).get_image_measurement_groups()
    ms_evaluation, *_ = ms_group.get_qualitative_evaluations()
    assert (ms_evaluation.value.value, ms_evaluation.value.scheme_designator) == (
        "24700007", "SCT")  # SNOMED CT: multiple sclerosis


# --------------------------------------------------------------------------------------------
# dciodvfy, every variant, with the bundled model
# --------------------------------------------------------------------------------------------

EXPECTED_WARNINGS = (
    # the private coding scheme of the SR (declared in its Coding Scheme Identification)
    "Warning - Unrecognized defined term <99FLAIRCAD>",
    # the Parametric Map's Derived Pixel Contrast QUANTITY (tests/integration/test_pm_dciodvfy.py)
    "Warning - Unrecognized defined term <QUANTITY> for value 4",
)


@pytest.mark.parametrize(("variant", "compress"), [
    ("axial", None), ("sagittal", None), ("oblique", None), ("axial", "jpegls")])
def test_outputs_pass_dciodvfy(phantom_series: PhantomFactory, engine: Engine, tmp_path: Path,
                               variant: str, compress: str | None) -> None:
    require(shutil.which("dciodvfy"), "dciodvfy is not on PATH (apt-get install dicom3tools)")
    analysis = analyse(iter_folder(phantom_series(variant=variant, compress=compress)), engine)
    written = write_outputs(analysis, tmp_path)
    assert written["pm"] is not None and written["sr"] is not None
    errors, seen = dciodvfy([*written["sc"], written["pm"], written["sr"]])
    assert errors == []
    unexpected = {w for w in seen if not w.startswith(EXPECTED_WARNINGS)}
    assert unexpected == set()
    for data in analysis.instances():
        _read_strictly(data)


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


def _tracking_uids(group: Dataset) -> set[str]:
    return {str(i.UID) for i in _items(group) if i.ValueType == "UIDREF"
            and i.ConceptNameCodeSequence[0].CodeValue == "112040"}


def test_the_sr_anchors_the_result_at_the_map_peak_for_ohif(phantom_series: PhantomFactory,
                                                             engine: Engine,
                                                             tmp_path: Path) -> None:
    analysis = analyse(iter_folder(phantom_series()), engine)  # a map that is not all zero
    report = analysis.sr_dataset()
    assert str(report.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    groups = [i for i in _items(report) if i.ValueType == "CONTAINER"
              and i.ConceptNameCodeSequence[0].CodeValue == "125007"]  # Measurement Group
    # OHIF merges groups by Tracking UID and draws a merged group that has a SCOORD: one UID
    assert len(groups) >= 2 and len({frozenset(_tracking_uids(g)) for g in groups}) == 1
    circles = [i for i in _items(report) if i.ValueType == "SCOORD"]
    points = [i for i in _items(report) if i.ValueType == "SCOORD3D"]
    assert [str(c.GraphicType) for c in circles] == ["CIRCLE"] and len(points) == 1
    (image,) = circles[0].ContentSequence
    sources = {str(ds.SOPInstanceUID) for ds in (pydicom.dcmread(p) for p in
                                                 sorted(phantom_series().glob("*.dcm")))}
    assert str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in sources
    source_frame = pydicom.dcmread(sorted(phantom_series().glob("*.dcm"))[0])
    assert str(points[0].ReferencedFrameOfReferenceUID) == str(source_frame.FrameOfReferenceUID)
    # the measurement at the peak cites the Parametric Map as its source
    cited = {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for r in _items(report)
             if r.ValueType == "IMAGE"}
    assert analysis.pm_sop_instance_uid in cited
    # without a Parametric Map the SR is still valid
    sr_only = analyse(iter_folder(phantom_series()), engine, outputs=["sr"])
    written = write_outputs(sr_only, tmp_path)
    assert written["sr"] is not None
    errors, _ = dciodvfy([written["sr"]])
    assert errors == []


# --------------------------------------------------------------------------------------------
# Sanitising copied attributes
# --------------------------------------------------------------------------------------------


def _nasty_copy(source: Path, target: Path) -> None:
    """The phantom series with the header defects real scanners write."""
    target.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each of them, as it should
        for path in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.PatientName = "M\u00fcller^J\u00f6rg^^^"  # latin-1, padded components
            ds.PatientID = "  PID-" + "7" * 70 + "  "  # padded and over 64 characters
            ds.PatientSex = "male"  # not an enumerated value
            ds.PatientBirthDate = "00000000"
            ds.StudyDate = "2024.01.15"  # ACR-NEMA form
            ds.StudyTime = "10:00:00"
            ds.StudyID = "STUDY-ID-WAY-TOO-LONG-FOR-SH"
            ds.AccessionNumber = "ACC\\123"  # a backslash: two values in a VM 1 attribute
            ds.ReferringPhysicianName = "Dr Who"
            ds.StudyDescription = "MRI\tBRAIN\x01 "
            ds.BodyPartExamined = "kopf"
            ds.Manufacturer = "Vendor " + "X" * 80
            ds.ManufacturerModelName = ""
            ds.PatientIdentityRemoved = "yes"
            ds.IssuerOfPatientID = ""
            ds.save_as(target / path.name)


def test_nasty_source_headers_still_give_valid_outputs(phantom_series: PhantomFactory,
                                                       tmp_path: Path) -> None:
    nasty = tmp_path / "nasty"
    _nasty_copy(phantom_series(variant="axial", slices=6), nasty)
    analysis = analyse(iter_folder(nasty), FakeEngine())
    written = write_outputs(analysis, tmp_path / "out")
    for data in analysis.instances():
        ds = _read_strictly(data)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "M\u00fcller^J\u00f6rg"
        assert len(ds.PatientID.encode()) <= 64 and ds.PatientID.startswith("PID-7")
        assert ds.PatientSex == "M" and ds.PatientBirthDate == ""
        assert (ds.StudyDate, ds.StudyTime) == ("20240115", "100000")
        assert ds.StudyID == "STUDY-ID-WAY-TOO" and ds.AccessionNumber == "ACC/123"
        assert str(ds.ReferringPhysicianName) == "Dr Who^"
        assert ds.StudyDescription == "MRI BRAIN"
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    capture = analysis.sc_datasets()[0]
    assert capture.BodyPartExamined == "BRAIN"
    acquisition = capture.ContributingEquipmentSequence[0]
    assert len(acquisition.Manufacturer) <= 64 and acquisition.Manufacturer.startswith("Vendor")
    # the warnings name what was changed, never the values
    (notice,) = [w for w in analysis.warnings if w.startswith("source attributes made valid")]
    for keyword in ("PatientName", "PatientSex", "StudyDate", "StudyID", "AccessionNumber"):
        assert keyword in notice
    assert not any("M\u00fcller" in w or "PID-7" in w for w in analysis.warnings)
    errors, seen = dciodvfy([*written["sc"], written["sr"]])
    assert errors == []
    assert {w for w in seen if not w.startswith(EXPECTED_WARNINGS)} == set()


def test_strict_reading_is_not_vacuous() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.PatientSex = "male"
    ds.StudyDate = "2024.01.15"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ValueError, match=r"Invalid value for VR (CS|DA)"):
        _read_strictly(buffer.getvalue())


def test_analysis_json_and_files(phantom_series: PhantomFactory, tmp_path: Path) -> None:
    analysis: Analysis = analyse(iter_folder(phantom_series()), FakeEngine())
    result = analysis.to_json()
    assert list(result) == ["study_instance_uid", "series_instance_uid", "prediction",
                            "probabilities", "slice_weights", "explanation", "distribution",
                            "input", "model", "calibration", "outputs", "timings_ms",
                            "warnings"]
    assert result["model"] == {"name": "fake-model", "version": "9.9",
                               "provider": "FakeExecutionProvider"}
    assert result["explanation"] == {"map": "hirescam", "description": EXPLANATIONS["hirescam"]}
    assert result["distribution"] == {
        "in_distribution": True, "score": 1.0, "threshold": OOD_THRESHOLD,
        "method": "mahalanobis", "statement": "within the training distribution"}
    assert result["calibration"] == {"temperature": 1.5, "fitted_on": "validation"}
    json.dumps(result)  # plain JSON types only
    assert list(result["timings_ms"]) == ["decode", "volume", "preprocess", "inference",
                                          "render", "encode", "total"]
    assert result["timings_ms"]["total"] >= sum(
        v for k, v in result["timings_ms"].items() if k != "total") - 0.5
    written = write_outputs(analysis, tmp_path)
    assert written["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(written["sc"]) == 24 and written["sr"].is_file()


@pytest.mark.parametrize("sample", ["siemens_xa30_t1w_mprage_enhanced",
                                    "siemens_xa30_t1w_mprage_jpeglossless"])
def test_real_scanner_series_give_valid_outputs(dicom_samples: Path, tmp_path: Path,
                                                sample: str) -> None:
    """Real Siemens headers (one enhanced multi-frame file, one classic JPEG Lossless series;
    T1 MPRAGE, so through the research override): valid outputs, one SC per frame."""
    folder = dicom_samples / sample / "dicom"
    analysis = analyse(iter_folder(folder), FakeEngine(), accept_non_flair=True)
    written = write_outputs(analysis, tmp_path)
    sources = _sources(folder)
    captures = analysis.sc_datasets()
    assert len(captures) == 96
    references = [ds.SourceImageSequence[0] for ds in captures]
    for ds, reference in zip(captures, references, strict=True):
        source = sources[reference.ReferencedSOPInstanceUID]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    if sample.endswith("enhanced"):  # one instance: each SC names its frame, in frame order
        assert len(sources) == 1
        assert [int(r.ReferencedFrameNumber) for r in references] == list(range(1, 97))
    else:
        assert all("ReferencedFrameNumber" not in r for r in references)
        numbers = [int(sources[r.ReferencedSOPInstanceUID].InstanceNumber) for r in references]
        assert numbers == sorted(numbers) and len(set(numbers)) == 96
    for data in analysis.instances():
        _read_strictly(data)
    errors, seen = dciodvfy([*written["sc"], written["sr"]])
    assert errors == []
    assert {w for w in seen if not w.startswith(EXPECTED_WARNINGS)} == set()
