"""The explanation map as a DICOM Parametric Map (highdicom), laid over the source series.

One multi-frame Parametric Map instance per result: the map of the chosen explanation
(HiResCAM, Grad-CAM or attention, ``FLAIRCAD_EXPLANATION``), as 32-bit Float Pixel Data in
[0, 1] (normalised over the series, as the Secondary Captures show it), on the source geometry:

* the source's Frame of Reference, one frame per source slice (a frame of a multi-frame
  source counts as a slice), each frame's Plane Position / Plane Orientation / Pixel Measures
  those of its source slice, frames in ascending position along the slice normal (row x
  column cosines) whatever order the volume has, since OHIF lays frame k on slice k of its
  sorted source volume (highdicom's 3D dimension organisation);
* per frame a Derivation Image Sequence referencing the source image (and frame) it lies on,
  Spatial Locations Preserved YES; all source instances in the Common Instance Reference;
* a Real World Value Mapping that says which map it is: LUT Label ``HIRESCAM`` /
  ``GRADCAM`` / ``ATTENTION``, unit UCUM ``1`` (no units), identity on 0.0–1.0, and a quantity
  concept in the private scheme ``99FLAIRCAD`` (:mod:`service.pipeline.sr` uses it too;
  declared in the Coding Scheme Identification Sequence). No standard concept names a
  class-activation map, so the quantity is private;
* Pixel Presentation MONOCHROME with a VOI window 0.5 / 1.0; viewers that overlay maps (OHIF's
  Parametric Map support, 3D Slicer) apply a colour map of their own;
* ContentLabel ``RESEARCH_ONLY``, ContentDescription and SeriesDescription naming the map and
  "RESEARCH USE ONLY", ContentQualification RESEARCH, BodyPartExamined from the header (BRAIN),
  Manufacturer flaircad with the model as model name / software version and device serial
  number, the model as processing equipment, the scanner as acquisition equipment.

The palette (``palette=True``): Pixel Presentation COLOR_RANGE with the standard HOT_IRON
palette (its LUT data, widened to 16-bit entries, and its sRGB ICC profile, from pydicom's copy
of the well-known palette) and a Stored Value Color Range 0.0–1.0 that maps the float values
onto it. highdicom writes palettes for integer pixel data only; the standard allows them for
float data through that macro, so this module adds the attributes after highdicom has built
the rest. It is off by default because dciodvfy (the Debian 2022 release and the 2026 one
alike) checks Minimum / Maximum Stored Value Mapped, which are FD, against a list of *string*
values and reports two errors on every COLOR_RANGE Parametric Map
(:data:`DCIODVFY_COLOR_RANGE_ERRORS`).

Patient and study attributes come from :func:`service.pipeline.sanitize.reference_header`:
highdicom copies them from its first source image, so it gets stand-ins for the sources that
carry the cleaned header plus only the sources' identity and geometry (never their raw
patient attributes, and no pixels).

Memory: highdicom encodes the map once into the Float Pixel Data bytes (4 bytes a voxel, as
the caller's float32 ``cam``); building peaks at about twice the map's size on top of ``cam``,
and Part 10 encoding adds one more copy (``tests/unit/test_pm.py`` bounds it). The first
Parametric Map (or any highdicom object that copies patient modules) of a process also loads
highdicom's module tables, about 60 MB, once.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence
from typing import Any

import highdicom
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.data import get_palette_files
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut

from service.core.contract import EXPLANATIONS
from service.core.volume import SliceSource
from service.pipeline.overlay import explanation_label
from service.pipeline.sanitize import OPTIONAL_PATIENT_STUDY, clean_text, clean_uid
from service.pipeline.sc import RESEARCH_STATEMENT, SOFTWARE, ModelIdentity, processing_equipment
from service.pipeline.sr import CODING_SCHEME, NO_UNITS, PRIVATE_SCHEME

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
CONTENT_LABEL = "RESEARCH_ONLY"
HOT_IRON_UID = "1.2.840.10008.1.5.1"  # PS3.6 Annex B well-known palette
VALUE_RANGE = (0.0, 1.0)
# what dciodvfy says about every COLOR_RANGE Parametric Map (see the module docstring)
DCIODVFY_COLOR_RANGE_ERRORS = (
    "Error - Non-string attribute while verifying string enumerated value for attribute "
    "<Minimum Stored Value Mappe>",
    "Error - Non-string attribute while verifying string enumerated value for attribute "
    "<Maximum Stored Value Mapped>",
)
# Identity and geometry of a source image: what highdicom reads to place and reference the
# frames (no patient attributes, no pixels)
_GEOMETRY = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns",
             "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient",
             "PixelSpacing", "SliceThickness", "SpacingBetweenSlices")
_SHARED_GEOMETRY = ("PixelMeasuresSequence", "PlaneOrientationSequence")
_LOSSY = ("LossyImageCompressionRatio", "LossyImageCompressionMethod")
# Patient / study attributes highdicom's SOPClass takes as arguments
_REQUIRED_HEADER = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName")


class ParametricMapUnavailable(ValueError):
    """The source series cannot carry a map laid over it (e.g. it has no Frame of
    Reference): the caller skips the Parametric Map and says so."""


def quantity_concept(explanation: str) -> highdicom.sr.CodedConcept:
    """The private quantity of the map ``explanation`` (``99FLAIRCAD``, see module docstring)."""
    label = explanation_label(explanation)
    return highdicom.sr.CodedConcept(explanation.upper()[:16], PRIVATE_SCHEME,
                                     clean_text(f"{label} explanation map value", 64))


def real_world_value_mapping(explanation: str) -> RealWorldValueMapping:
    """Identity on 0.0–1.0, unit "1", labelled with the map's name."""
    label = explanation_label(explanation)
    return RealWorldValueMapping(
        lut_label=explanation.upper()[:16],
        lut_explanation=clean_text(f"{label} map of the predicted class, 0-1 over the series",
                                   64),
        unit=NO_UNITS,
        value_range=VALUE_RANGE,
        quantity_definition=quantity_concept(explanation),
    )


@functools.cache
def hot_iron() -> tuple[highdicom.PaletteColorLUTTransformation, bytes]:
    """The HOT_IRON palette and its sRGB ICC profile, from pydicom's copy of the standard's
    well-known palette; its 8-bit entries widened to the 16 bits the Parametric Map IOD asks
    for (x 257: 255 becomes 65535)."""
    colours = apply_color_lut(np.arange(256, dtype=np.uint8), palette=HOT_IRON_UID)
    luts = [highdicom.PaletteColorLUT(
                first_mapped_value=0,
                lut_data=colours[:, i].astype(np.uint16) * np.uint16(257),
                color=colour)
            for i, colour in enumerate(("red", "green", "blue"))]
    # the UID of the well-known palette names 8-bit entries: these are 16-bit, and with the
    # LUT data present the IOD forbids Palette Color Lookup Table UID anyway
    palette = highdicom.PaletteColorLUTTransformation(luts[0], luts[1], luts[2])
    icc = pydicom.dcmread(get_palette_files("hotiron.dcm")[0]).ICCProfile
    return palette, bytes(icc)


def _stand_in(source: Dataset, header: Dataset, frame_of_reference_uid: str) -> Dataset:
    """A source image as highdicom sees it: identity and geometry of ``source``, patient and
    study attributes of the cleaned ``header``. Elements are shared, not copied."""
    ds = Dataset()
    for keyword in _GEOMETRY:
        if keyword in source:
            ds[keyword] = source[keyword]
    if "PerFrameFunctionalGroupsSequence" in source:
        _add_frame_geometry(ds, source)
    for element in header:
        ds[element.tag] = element
    ds.FrameOfReferenceUID = frame_of_reference_uid
    # lossy compression at any point of the source's life carries over to derived images
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        ds.LossyImageCompression = "01"
        for keyword in _LOSSY:
            if keyword in source:
                ds[keyword] = source[keyword]
    return ds


def _add_frame_geometry(ds: Dataset, source: Dataset) -> None:
    """The functional groups of a multi-frame source, reduced to its geometry, with pixel
    measures and orientation shared: highdicom reads them from the shared groups only, and
    scanners (Siemens XA, for one) put them in every frame instead. The volume stage has
    checked that they are the same in every frame."""
    frames = source.PerFrameFunctionalGroupsSequence
    shared_source = (source.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    shared = Dataset()
    for keyword in _SHARED_GEOMETRY:
        if keyword in shared_source:
            shared[keyword] = shared_source[keyword]
        elif len(frames) and keyword in frames[0]:
            shared[keyword] = frames[0][keyword]
    ds.SharedFunctionalGroupsSequence = [shared]
    positions = []
    for frame in frames:
        item = Dataset()
        if "PlanePositionSequence" in frame:
            item[0x00209113] = frame[0x00209113]
        positions.append(item)
    ds.PerFrameFunctionalGroupsSequence = positions


def _plane_positions(by_uid: dict[str, Dataset], slices: Sequence[SliceSource],
                     affine_lps: npt.ArrayLike) -> list[highdicom.PlanePositionSequence]:
    """Per slice, the position its source image (frame) states. highdicom matches frames to
    source images by position within 1 µm, so these, not the volume's regular grid (which
    may be up to 1 % of the spacing off for a series that is not quite regular), are what
    makes every frame reference its source; orientation and pixel measures it copies from the
    source. A position farther than half a voxel from the grid means the slices do not belong
    to this map: a ValueError."""
    affine = np.asarray(affine_lps, dtype=np.float64)
    tolerance = 0.5 * float(np.linalg.norm(affine[:3, :3], axis=0).min())
    positions = []
    for k, s in enumerate(slices):
        ds = by_uid[s.sop_instance_uid]
        if s.frame_number is not None:
            frame = ds.PerFrameFunctionalGroupsSequence[s.frame_number - 1]
            position = frame.PlanePositionSequence[0].ImagePositionPatient
        else:
            position = ds.ImagePositionPatient
        stated = np.asarray([float(v) for v in position])
        if np.linalg.norm(stated - (affine @ [k, 0.0, 0.0, 1.0])[:3]) > tolerance:
            raise ValueError(f"slice {k} of the map lies away from its source image")
        positions.append(highdicom.PlanePositionSequence("PATIENT", stated.tolist()))
    return positions


def _checked_map(cam: npt.ArrayLike, slices: Sequence[SliceSource]) -> npt.NDArray[np.float32]:
    array = np.asarray(cam, dtype=np.float32)  # no copy for the float32 cam of the pipeline
    if array.ndim != 3 or array.shape[0] != len(slices) or not len(slices):
        raise ValueError(f"map of shape {array.shape} for {len(slices)} source slices")
    low, high = float(array.min()), float(array.max())  # NaN propagates into both
    if not VALUE_RANGE[0] <= low <= high <= VALUE_RANGE[1]:
        raise ValueError(f"map values must lie in [0, 1], got [{low}, {high}]")
    return array


def _source_order(sources: Sequence[Dataset], slices: Sequence[SliceSource]) -> list[Dataset]:
    """The sources the slices come from, multi-frame ones first (highdicom takes one
    multi-frame image as *the* source, and matches further ones by position)."""
    wanted = {s.sop_instance_uid for s in slices}
    used = [ds for ds in sources if str(ds.get("SOPInstanceUID", "")) in wanted]
    if len({str(ds.SOPInstanceUID) for ds in used}) != len(wanted):
        raise ValueError("the slices reference source instances that are not in ``sources``")
    return sorted(used, key=lambda ds: "NumberOfFrames" not in ds)


def build_parametric_map(
    cam: npt.ArrayLike,
    sources: Sequence[Dataset],
    slices: Sequence[SliceSource],
    affine_lps: npt.ArrayLike,
    frame_of_reference_uid: str | None,
    header: Dataset,
    *,
    model: ModelIdentity,
    explanation: str,
    series_number: int,
    series_instance_uid: str | None = None,
    palette: bool = False,
) -> ParametricMap:
    """The Parametric Map of ``cam`` ((slices, rows, columns) float32 in [0, 1], slice k from
    ``slices[k]``, ``affine_lps`` mapping (k, r, c, 1) to LPS mm: a
    :class:`service.core.volume.SeriesVolume`'s grid). ``sources`` are the source datasets
    (headers suffice; pixel data may be gone); ``header`` a
    :func:`service.pipeline.sanitize.reference_header` dataset. Raises
    :class:`ParametricMapUnavailable` when the series has no (writable) Frame of Reference,
    ValueError for a map that does not fit the slices or leaves [0, 1]. ``palette`` adds the
    HOT_IRON palette (Pixel Presentation COLOR_RANGE; see the module docstring for why it is
    off by default)."""
    if explanation not in EXPLANATIONS:
        raise ValueError(f"unknown explanation map {explanation!r}")
    frame_uid = clean_uid(frame_of_reference_uid)
    if frame_uid is None:
        raise ParametricMapUnavailable(
            "the source series has no usable Frame of Reference UID, so a map cannot be laid "
            "over it")
    array = _checked_map(cam, slices)
    used = _source_order(sources, slices)
    stand_ins = [_stand_in(ds, header, frame_uid) for ds in used]
    first_multiframe = "NumberOfFrames" in stand_ins[0]
    label = explanation_label(explanation)
    positions = _plane_positions({str(ds.SOPInstanceUID): ds for ds in stand_ins}, slices,
                                 affine_lps)
    model_name = clean_text(model.name, 64) or "unnamed model"
    model_version = clean_text(model.version, 64) or "unknown"
    now = datetime.datetime.now()
    pm = ParametricMap(
        source_images=stand_ins[:1] if first_multiframe else stand_ins,
        further_source_images=stand_ins[1:] if first_multiframe else None,
        pixel_array=array,
        plane_positions=positions,
        series_instance_uid=series_instance_uid or highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        # the software has no serial number; the model identifies the device
        device_serial_number=clean_text(f"{model_name} {model_version}", 64),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[real_world_value_mapping(explanation)],
        voi_lut_transformations=[highdicom.VOILUTTransformation(
            window_center=[0.5], window_width=[1.0],
            window_explanation=["FULL RANGE 0-1"])],
        content_label=CONTENT_LABEL,
        content_description=clean_text(
            f"{SOFTWARE} {label} map - {RESEARCH_STATEMENT}", 64),
        contributing_equipment=[processing_equipment(model, f"{label} map")],
        series_description=clean_text(f"{SOFTWARE} {label} map - RESEARCH ONLY", 64),
        coding_schemes=[CODING_SCHEME],
        content_date=now.date(),
        content_time=now.time(),
        specific_character_set=header.SpecificCharacterSet,
    )
    _complete(pm, header, explanation, model)
    _frames_along_normal(pm)
    if palette:
        _add_palette(pm)
    return pm


def _frames_along_normal(pm: ParametricMap) -> None:
    """Reorder the frames in ascending position along the slice normal (row x column
    cosines), in place. highdicom sorts them the other way (its volume index convention);
    OHIF 3.13 lays frame k of a Parametric Map on slice k of its source volume, which it
    sorts along this normal, and does not read the per-frame references, so highdicom's order
    draws the map mirrored through the stack. Each frame keeps its functional groups (and so
    its position and source reference); the Dimension Index Values count 1..N in the new
    order, as highdicom numbers them in its own. Only the order of frames changes:
    ``tests/unit/test_pm.py`` reads the map back and compares every frame with the map slice
    its source reference names. highdicom's in-memory frame index of ``pm`` is left stale;
    callers only encode it."""
    orientation = np.asarray(
        pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        .ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    items = list(pm.PerFrameFunctionalGroupsSequence)
    along = [float(np.dot(normal, np.asarray(item.PlanePositionSequence[0]
                                             .ImagePositionPatient, dtype=np.float64)))
             for item in items]
    order = np.argsort(along, kind="stable")
    if np.array_equal(order, np.arange(len(items))):
        return
    data = memoryview(pm.FloatPixelData)
    size = len(data) // len(items)
    # joined from views of highdicom's bytes: one more copy of the map, briefly
    pm.FloatPixelData = b"".join(data[i * size:(i + 1) * size] for i in order)
    data.release()
    pm.PerFrameFunctionalGroupsSequence = [items[i] for i in order]
    for index, item in enumerate(pm.PerFrameFunctionalGroupsSequence, start=1):
        item.FrameContentSequence[0].DimensionIndexValues = index


def _complete(pm: ParametricMap, header: Dataset, explanation: str,
              model: ModelIdentity) -> None:
    """Attributes highdicom leaves to the caller."""
    for keyword in OPTIONAL_PATIENT_STUDY:
        if keyword in header and keyword not in pm:
            setattr(pm, keyword, header.get(keyword))
    # an unpaired body part, so no Laterality is needed (General Series, Type 2C)
    pm.BodyPartExamined = header.get("BodyPartExamined") or "BRAIN"
    pm.DerivationDescription = clean_text(
        f"{explanation_label(explanation)}: {EXPLANATIONS[explanation]} ({model.name} "
        f"{model.version}), computed on the model grid, mapped back onto each source slice "
        f"and normalised to 0-1 over the whole series. {RESEARCH_STATEMENT}.", 1024,
        multiline=True)


def _add_palette(pm: ParametricMap) -> None:
    """HOT_IRON over stored values 0.0–1.0 (see the module docstring for why not highdicom)."""
    palette, icc = hot_iron()
    pm.PixelPresentation = "COLOR_RANGE"
    for element in palette:
        pm[element.tag] = element
    pm.ICCProfile = icc
    pm.ColorSpace = "SRGB"
    color_range = Dataset()
    color_range.MinimumStoredValueMapped = VALUE_RANGE[0]
    color_range.MaximumStoredValueMapped = VALUE_RANGE[1]
    pm.SharedFunctionalGroupsSequence[0].StoredValueColorRangeSequence = [color_range]


def frame_sources(pm: Dataset) -> list[tuple[str, int | None]]:
    """Per frame of a Parametric Map, the (SOP Instance UID, frame number or None) of the
    source image it derives from (its Derivation Image Sequence)."""
    out: list[tuple[str, int | None]] = []
    for item in pm.PerFrameFunctionalGroupsSequence:
        reference: Any = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = reference.get("ReferencedFrameNumber")
        out.append((str(reference.ReferencedSOPInstanceUID),
                    None if frame is None else int(frame)))
    return out
