"""The explanation map as a Parametric Map (service.pipeline.pm): geometry, references,
values, labels and the palette option, read back through pydicom and highdicom."""

from __future__ import annotations

import dataclasses
import io
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian

from service.core.contract import EXPLANATIONS
from service.core.series import Series, ingest_folder
from service.core.volume import SeriesVolume, convert
from service.pipeline import pm, sanitize, sc
from tests.conftest import PhantomFactory

MODEL = sc.ModelIdentity("fake-model", "9.9")
ENHANCED = "siemens_xa30_t1w_mprage_enhanced"


@dataclass
class Inputs:
    series: Series
    volume: SeriesVolume
    header: Dataset
    cam: np.ndarray


def inputs(folder: Path) -> Inputs:
    """What analyse() holds after its render stage: headers without pixels, the volume, the
    cleaned header and a [0, 1] float32 map on the volume's grid."""
    series = ingest_folder(folder).series[0]
    volume = convert(series).volume
    assert volume is not None
    for instance in series.instances:
        for tag in (0x7FE00008, 0x7FE00009, 0x7FE00010):
            if tag in instance.dataset:
                del instance.dataset[tag]
    cam = np.random.default_rng(7).random(volume.array.shape, dtype=np.float32)
    cam[0, 0, 0], cam[-1, -1, -1] = 0.0, 1.0
    header = sanitize.reference_header(series.instances[0].dataset).dataset
    return Inputs(series, volume, header, cam)


def build(data: Inputs, explanation: str = "hirescam",
          palette: bool = False) -> highdicom.pm.ParametricMap:
    return pm.build_parametric_map(
        data.cam, [i.dataset for i in data.series.instances], data.volume.slices,
        data.volume.affine_lps, data.volume.frame_of_reference_uid, data.header,
        model=MODEL, explanation=explanation, series_number=3001, palette=palette)


def read_back(map_: Dataset) -> highdicom.pm.ParametricMap:
    data = sc.encode_part10(map_)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    return highdicom.pm.ParametricMap.from_dataset(ds)


def _source_frame_geometry(ds: Dataset, frame: int | None) -> tuple[list[float], list[float],
                                                                    list[float]]:
    if frame is None:
        return ([float(v) for v in ds.ImagePositionPatient],
                [float(v) for v in ds.ImageOrientationPatient],
                [float(v) for v in ds.PixelSpacing])
    item = ds.PerFrameFunctionalGroupsSequence[frame - 1]
    return ([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in item.PlaneOrientationSequence[0].ImageOrientationPatient],
            [float(v) for v in item.PixelMeasuresSequence[0].PixelSpacing])


def assert_on_source_geometry(data: Inputs, back: highdicom.pm.ParametricMap) -> None:
    """One frame per source slice; each references its source image (and frame), sits where
    that source says, and holds exactly the map's values of that slice."""
    slices = data.volume.slices
    assert back.SOPClassUID == pm.PARAMETRIC_MAP_STORAGE
    assert back.FrameOfReferenceUID == data.volume.frame_of_reference_uid
    assert int(back.NumberOfFrames) == len(slices)
    assert back.BitsAllocated == 32 and "FloatPixelData" in back
    index = {(s.sop_instance_uid, s.frame_number): k for k, s in enumerate(slices)}
    sources = {str(i.dataset.SOPInstanceUID): i.dataset for i in data.series.instances}
    shared = back.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    frames = back.pixel_array
    seen = set()
    for i, (reference, item) in enumerate(zip(pm.frame_sources(back),
                                              back.PerFrameFunctionalGroupsSequence,
                                              strict=True)):
        k = index[reference]
        seen.add(k)
        position, iop, pixel = _source_frame_geometry(sources[reference[0]], reference[1])
        frame_position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(frame_position, position, atol=1e-4)
        assert np.allclose(orientation, iop, atol=1e-6)
        assert np.allclose(spacing, pixel, atol=1e-6)
        derivation = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.SpatialLocationsPreserved == "YES"
        assert np.array_equal(frames[i], data.cam[k])
    assert seen == set(range(len(slices)))
    # OHIF lays frame k on slice k of its source volume, sorted along the normal
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot(normal, [float(v) for v in
                                   item.PlanePositionSequence[0].ImagePositionPatient]))
             for item in back.PerFrameFunctionalGroupsSequence]
    assert np.all(np.diff(along) > 0), along


def reversed_volume(data: Inputs) -> Inputs:
    """The same series with the volume's slice axis flipped (and its map with it)."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, len(data.volume.slices) - 1
    volume = dataclasses.replace(
        data.volume, array=data.volume.array[::-1], affine_lps=data.volume.affine_lps @ flip,
        slices=data.volume.slices[::-1])
    return dataclasses.replace(data, volume=volume, cam=data.cam[::-1])


def test_frames_ascend_along_the_normal_whichever_way_the_volume_runs(
        phantom_series: PhantomFactory) -> None:
    data = inputs(phantom_series())
    flipped = reversed_volume(data)
    assert np.allclose(data.volume.affine_lps[:3, 0], -flipped.volume.affine_lps[:3, 0])
    for case in (data, flipped):
        assert_on_source_geometry(case, read_back(build(case)))


@pytest.mark.parametrize(("variant", "slices"), [("axial", None), ("sagittal", 16),
                                                 ("oblique", None)])
def test_map_round_trips_on_the_source_geometry(phantom_series: PhantomFactory, variant: str,
                                                slices: int | None) -> None:
    data = inputs(phantom_series(variant=variant, slices=slices))
    assert_on_source_geometry(data, read_back(build(data)))


def test_enhanced_multiframe_source_frames_are_referenced(dicom_samples: Path) -> None:
    data = inputs(dicom_samples / ENHANCED / "dicom")
    assert all(s.frame_number is not None for s in data.volume.slices)
    back = read_back(build(data))
    assert_on_source_geometry(data, back)
    assert {frame for _, frame in pm.frame_sources(back)} == set(range(1, 97))


@pytest.mark.parametrize("explanation", sorted(EXPLANATIONS))
def test_labels_say_which_map_and_research_use(phantom_series: PhantomFactory,
                                               explanation: str) -> None:
    back = read_back(build(inputs(phantom_series()), explanation))
    mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == explanation.upper()
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert mapping.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert (mapping.DoubleFloatRealWorldValueFirstValueMapped,
            mapping.DoubleFloatRealWorldValueLastValueMapped) == (0.0, 1.0)
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == (explanation.upper(),
                                                                     "99FLAIRCAD")
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99FLAIRCAD"
    assert back.ContentLabel == "RESEARCH_ONLY"
    assert "RESEARCH USE ONLY" in back.ContentDescription
    assert "RESEARCH ONLY" in back.SeriesDescription
    assert back.ContentQualification == "RESEARCH"
    assert back.Manufacturer == "flaircad"
    assert back.ManufacturerModelName == MODEL.name
    assert back.PixelPresentation == "MONOCHROME"
    assert back.BodyPartExamined == "BRAIN"
    voi = back.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert (voi.WindowCenter, voi.WindowWidth) == (0.5, 1.0)
    assert voi.WindowCenterWidthExplanation == "FULL RANGE 0-1"


def test_patient_and_study_come_from_the_cleaned_header(phantom_series: PhantomFactory) -> None:
    data = inputs(phantom_series())
    for instance in data.series.instances:  # raw values the header must stand in for
        instance.dataset.PatientID = "RAW-ID"
        instance.dataset.PatientName = "Raw^Name"
    data.header.PatientID, data.header.PatientName = "CLEAN-ID", "Clean^Name"
    back = read_back(build(data))
    assert (back.PatientID, str(back.PatientName)) == ("CLEAN-ID", "Clean^Name")
    assert back.StudyInstanceUID == data.header.StudyInstanceUID


def test_palette_option_adds_hot_iron_over_0_to_1(phantom_series: PhantomFactory) -> None:
    data = inputs(phantom_series())
    back = read_back(build(data, palette=True))
    assert back.PixelPresentation == "COLOR_RANGE"
    assert list(back.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
    hot = apply_color_lut(np.arange(256, dtype=np.uint8), palette="1.2.840.10008.1.5.1")
    for i, colour in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(back[f"{colour}PaletteColorLookupTableData"].value, "<u2")
        assert np.array_equal(lut, hot[:, i].astype(np.uint16) * 257)
    color_range = back.SharedFunctionalGroupsSequence[0].StoredValueColorRangeSequence[0]
    assert (color_range.MinimumStoredValueMapped, color_range.MaximumStoredValueMapped) == (
        0.0, 1.0)
    assert len(back.ICCProfile) > 0 and "PaletteColorLookupTableUID" not in back
    assert_on_source_geometry(data, back)


def test_refuses_what_it_cannot_write(phantom_series: PhantomFactory) -> None:
    data = inputs(phantom_series())
    sources = [i.dataset for i in data.series.instances]
    slices, affine = data.volume.slices, data.volume.affine_lps
    frame = data.volume.frame_of_reference_uid

    def attempt(cam: np.ndarray, *, frame_uid: str | None = frame, order: int = 1,
                explanation: str = "hirescam") -> None:
        pm.build_parametric_map(cam, sources, slices[::order], affine, frame_uid, data.header,
                                model=MODEL, explanation=explanation, series_number=1)

    with pytest.raises(pm.ParametricMapUnavailable):
        attempt(data.cam, frame_uid=None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attempt(data.cam * 2)
    with pytest.raises(ValueError, match="source slices"):
        attempt(data.cam[1:])
    with pytest.raises(ValueError, match="away from its source"):
        attempt(data.cam, order=-1)
    with pytest.raises(ValueError, match="unknown explanation"):
        attempt(data.cam, explanation="saliency")


def test_memory_stays_within_a_few_maps(phantom_series: PhantomFactory) -> None:
    """Building and encoding hold the map's bytes a few times over, not per-frame objects
    that grow with it (highdicom's one-off module tables are loaded by the warm-up)."""
    data = inputs(phantom_series())
    sc.encode_part10(build(data))
    tracemalloc.start()
    try:
        encoded = sc.encode_part10(build(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(encoded) > data.cam.nbytes
    assert peak < 3.5 * data.cam.nbytes + 4_000_000, peak
