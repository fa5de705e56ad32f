"""Explanation-map overlays as a DICOM Secondary Capture series in the source study (highdicom).

One RGB instance per source slice (a frame of a multi-frame source counts as a slice), with
that slice's Rows and Columns, in the source's reading order (InstanceNumber 1..N). Patient
and study attributes come from :func:`service.pipeline.sanitize.reference_header`, never straight
from
the scanner header. Each instance says what it is and where it came from:

* SeriesDescription, ImageComments and the burned-in banner: the map shown (HiResCAM, Grad-CAM
  or attention, ``FLAIRCAD_EXPLANATION``), model, research use, and "OUTSIDE THE TRAINING
  DISTRIBUTION" when the model's distribution check flagged the input;
* SourceImageSequence: the source image (and frame), purpose "Source image for image
  processing operation" (DCM 121322);
* DerivationDescription: how the overlay was made; BurnedInAnnotation YES (the banner);
* ContributingEquipmentSequence: the scanner that acquired the source (when it says who made
  it) and flaircad with the model name and version (DCM 109102 "Processing Equipment");
* ConversionType WSD (workstation), ImageType DERIVED\\SECONDARY\\OTHER.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom
import numpy as np
import numpy.typing as npt
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element, write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS
from service.pipeline.overlay import (
    NOT_FLAIR_BANNER,
    OUTSIDE_DISTRIBUTION_BANNER,
    explanation_label,
)
from service.pipeline.sanitize import OPTIONAL_PATIENT_STUDY, clean_text

RESEARCH_STATEMENT = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
SOFTWARE = "flaircad"
# LPS axis → (letter for +, letter for −) in PatientOrientation terms
_ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


@dataclass(frozen=True)
class SourceImage:
    """The source image (and frame, for multi-frame objects) one overlay derives from."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str


def patient_orientation(affine_lps: npt.ArrayLike) -> tuple[str, str]:
    """PatientOrientation of the slices of a (slices, rows, columns) volume: the patient
    direction along a row (increasing column index), then down a column; the dominant axis for
    oblique planes (highdicom accepts single letters only)."""
    affine = np.asarray(affine_lps, dtype=np.float64)

    def letter(direction: npt.NDArray[np.float64]) -> str:
        axis = int(np.argmax(np.abs(direction)))
        return _ORIENTATION_LETTERS[axis][0 if direction[axis] > 0 else 1]

    return letter(affine[:3, 2]), letter(affine[:3, 1])


def processing_equipment(model: ModelIdentity, what: str) -> highdicom.ContributingEquipment:
    return highdicom.ContributingEquipment(
        manufacturer=SOFTWARE,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=clean_text(model.name, 64) or "unnamed model",
        software_versions=clean_text(model.version, 64) or "unknown",
        contribution_datetime=datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
        contribution_description=clean_text(f"{what} - {RESEARCH_STATEMENT}", 64),
    )


def acquisition_equipment(header: Dataset) -> highdicom.ContributingEquipment | None:
    """The scanner that made the source images, when the header names its manufacturer."""
    if not header.get("Manufacturer"):
        return None
    return highdicom.ContributingEquipment(
        manufacturer=header.Manufacturer,
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        manufacturer_model_name=header.get("ManufacturerModelName") or None,
        contribution_description="Acquisition equipment of the source images",
    )


def distribution_comment(distribution: Mapping[str, Any] | None) -> str:
    """The distribution assessment as a sentence (with a leading space), "" without one."""
    if not distribution:
        return ""
    score, threshold = distribution.get("score"), distribution.get("threshold")
    measured = f" ({distribution.get('method', 'distance')} score {score}, threshold {threshold})"
    if distribution.get("in_distribution", True):
        return f" Within the training distribution{measured}."
    return (f" {OUTSIDE_DISTRIBUTION_BANNER}{measured}: the input is unlike the data the model "
            "was trained on, so its result and map are unreliable.")


def flair_comment(flair_recognised: bool) -> str:
    """A sentence (with a leading space) when the input matched no FLAIR rule, else ""."""
    if flair_recognised:
        return ""
    return (f" {NOT_FLAIR_BANNER}: the input series was not recognised as T2-FLAIR and was "
            "analysed only because the non-FLAIR override (FLAIRCAD_ACCEPT_NON_FLAIR) is on.")


def series_description(prediction: str, explanation: str = DEFAULT_EXPLANATION) -> str:
    """E.g. "flaircad HiResCAM MS - RESEARCH ONLY" (at most 64 characters)."""
    label = explanation_label(explanation)
    return clean_text(f"flaircad {label} {clean_text(prediction, 28)} - RESEARCH ONLY", 64)


def build_secondary_captures(
    images: Sequence[npt.NDArray[np.uint8]],
    sources: Sequence[SourceImage],
    header: Dataset,
    *,
    model: ModelIdentity,
    prediction: str,
    probabilities_text: str,
    series_number: int,
    pixel_spacing: tuple[float, float],
    orientation: tuple[str, str],
    series_instance_uid: str | None = None,
    explanation: str = DEFAULT_EXPLANATION,
    distribution: Mapping[str, Any] | None = None,
    flair_recognised: bool = True,
) -> list[Dataset]:
    """One SC instance per image, ``images[i]`` derived from ``sources[i]``; InstanceNumber
    i + 1. ``header`` is a :func:`service.pipeline.sanitize.reference_header` dataset.
    ``explanation``
    names the map the images show; ``distribution`` is the model's distribution assessment
    (:meth:`service.core.contract.DistributionCheck.assess`), stated in ImageComments."""
    if len(images) != len(sources) or not images:
        raise ValueError(f"{len(images)} images for {len(sources)} source images")
    label = explanation_label(explanation)
    series_uid = series_instance_uid or highdicom.UID()
    equipment = [e for e in (acquisition_equipment(header),
                             processing_equipment(model, f"{label} overlay")) if e is not None]
    description = series_description(prediction, explanation)
    derivation = clean_text(
        f"{label} overlay: {EXPLANATIONS[explanation]} ({model.name} {model.version}, "
        f"predicted class {prediction}), mapped from the model grid back to this source "
        "image, normalised over the whole series, JET colour map alpha-blended over the "
        f"windowed source image; result banner burned in. {RESEARCH_STATEMENT}.", 1024,
        multiline=True)
    comments = clean_text(
        f"{RESEARCH_STATEMENT}.{flair_comment(flair_recognised)}"
        f"{distribution_comment(distribution)} flaircad {model.name} "
        f"{model.version}: predicted {prediction} ({probabilities_text}); overlay: {label}.",
        10240, multiline=True)
    now = datetime.datetime.now()
    instances: list[Dataset] = []
    template: Dataset | None = None
    first_shape: tuple[int, ...] = ()
    for number, (pixels, source) in enumerate(zip(images, sources, strict=True), start=1):
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if template is not None and pixels.shape == first_shape:
            instances.append(_derive(template, number, pixels, source))
            continue
        sc = highdicom.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=header.StudyInstanceUID,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=highdicom.UID(),
            instance_number=number,
            manufacturer=SOFTWARE,
            patient_id=header.PatientID,
            patient_name=header.PatientName,
            patient_birth_date=header.PatientBirthDate,
            patient_sex=header.PatientSex,
            accession_number=header.AccessionNumber,
            study_id=header.StudyID,
            study_date=header.StudyDate,
            study_time=header.StudyTime,
            referring_physician_name=header.ReferringPhysicianName,
            pixel_spacing=pixel_spacing,
            patient_orientation=orientation,
            contributing_equipment=equipment,
            series_description=description,
            manufacturer_model_name=clean_text(model.name, 64) or None,
            software_versions=clean_text(model.version, 64) or None,
            content_date=now.date(),
            content_time=now.time(),
            specific_character_set=header.SpecificCharacterSet,
        )
        # the rest of the Patient and General Study modules, already cleaned in the header
        for keyword in OPTIONAL_PATIENT_STUDY:
            if keyword in header:
                setattr(sc, keyword, header.get(keyword))
        sc.BodyPartExamined = header.get("BodyPartExamined") or "BRAIN"
        sc.ConversionType = "WSD"
        sc.BurnedInAnnotation = "YES"
        sc.LossyImageCompression = "00"
        sc.DerivationDescription = derivation
        sc.ImageComments = comments
        sc.SourceImageSequence = [_source_reference(source)]
        instances.append(sc)
        if template is None:
            template, first_shape = sc, pixels.shape
    return instances


def _derive(template: Dataset, number: int, pixels: npt.NDArray[np.uint8],
            source: SourceImage) -> Dataset:
    """Another instance of the series: highdicom built and validated ``template``; the others
    differ only in identity, order, source reference and pixels. They share the template's
    other element objects, which nothing mutates (every per-instance element is a new object);
    a deep copy per instance would cost more than building the instance with highdicom."""
    uid = highdicom.UID()
    derived = Dataset({tag: template[tag] for tag in template.keys()})  # noqa: SIM118
    meta = template.file_meta
    derived.file_meta = FileMetaDataset({tag: meta[tag] for tag in meta.keys()})  # noqa: SIM118
    derived.file_meta[0x00020003] = DataElement(0x00020003, "UI", uid)
    derived[0x00080018] = DataElement(0x00080018, "UI", uid)
    derived[0x00200013] = DataElement(0x00200013, "IS", number)
    derived[0x00082112] = DataElement(0x00082112, "SQ", [_source_reference(source)])
    derived[0x7FE00010] = DataElement(0x7FE00010, template[0x7FE00010].VR, pixels.tobytes())
    return derived


def _source_reference(source: SourceImage) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.sop_class_uid
    reference.ReferencedSOPInstanceUID = source.sop_instance_uid
    if source.frame_number is not None:
        reference.ReferencedFrameNumber = source.frame_number
    purpose = highdicom.sr.CodedConcept.from_code(
        codes.DCM.SourceImageForImageProcessingOperation)
    reference.PurposeOfReferenceCodeSequence = [purpose]
    return reference


# Elements in which the instances of one SC series differ; everything else is shared.
_PER_INSTANCE = (0x00080018, 0x00080033, 0x00082112, 0x00200013, 0x7FE00010)


def encode_part10(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _written_tags(ds: Dataset) -> list[BaseTag]:
    """The tags dcmwrite writes, in its order (retired group lengths are skipped)."""
    keys = ds.keys()  # iterating a Dataset itself yields elements, not tags
    return sorted(tag for tag in keys if not (tag.element == 0 and tag.group > 6))


def encode_series(datasets: Sequence[Dataset]) -> list[bytes]:
    """Part 10 bytes of every instance, byte for byte what :func:`encode_part10` gives, but
    the elements the instances share with the first one are encoded once, not once per
    instance (pydicom writes element by element in Python: for a 200-slice series that is most
    of the encoding time). An instance that differs anywhere else is encoded in full."""
    if not datasets:
        return []
    first = datasets[0]
    encoded = [encode_part10(first)]  # also settles first's ambiguous VRs (OB/OW)
    charset = first.get("SpecificCharacterSet", default_encoding)
    tags = _written_tags(first)
    pieces: list[bytes | BaseTag] = []
    run = DicomBytesIO()
    run.is_little_endian, run.is_implicit_VR = True, False
    shared = [tag for tag in tags if tag not in _PER_INSTANCE]
    for tag in tags:
        if tag in _PER_INSTANCE:
            pieces += [run.getvalue(), tag]
            run = DicomBytesIO()
            run.is_little_endian, run.is_implicit_VR = True, False
        else:
            write_data_element(run, first[tag], charset)
    pieces.append(run.getvalue())
    syntax = first.file_meta.TransferSyntaxUID
    for ds in datasets[1:]:
        if (syntax != ExplicitVRLittleEndian or ds.file_meta.TransferSyntaxUID != syntax
                or _written_tags(ds) != tags
                or any(ds[tag].value != first[tag].value for tag in shared)):
            encoded.append(encode_part10(ds))
            continue
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta, enforce_standard=True)
        for piece in pieces:
            if isinstance(piece, bytes):
                out.write(piece)
            else:
                element = ds[piece]
                write_data_element(out, DataElement(piece, first[piece].VR, element.value),
                                   charset)
        encoded.append(out.getvalue())
    return encoded
