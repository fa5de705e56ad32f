"""The result as a DICOM Comprehensive 3D SR: a TID 1500 measurement report (highdicom
templates) that OHIF (3.13) draws and an integration engine can parse (IHE AI Results).

Content tree::

    Imaging Measurement Report (DCM 126000)
      Language, observation context: device observer "flaircad" (model name, version)
      Procedure reported: Brain MRI (LN 24590-2)
      Image Library (TID 1600): every analysed source instance (modality, Frame of Reference,
        rows, columns; single-frame images also pixel spacing, position, orientation, slice
        thickness; enhanced multi-frame images only the former: they have no top-level
        geometry and TID 1602 has no per-frame one)
      Imaging Measurements
        Measurement group (TID 1501)                                [tracking UID T]
          Tracking identifier: "MS vs cSVD classification (flaircad) - RESEARCH USE ONLY ..."
          Algorithm identification: model name, version, parameters (target_class=predicted,
            explanation_map=<hirescam|gradcam|attention>, explanation_normalisation=volume,
            calibration_temperature=<T>, ood_method=<method>, ood_threshold=<threshold>)
          Finding site: Brain (SCT 12738006)
          Measurements: Probability of <class> = p, unit UCUM "1" (one per class, metadata order)
                        Out-of-distribution score (model output) = s, unit UCUM "1"
          Qualitative evaluations: Predicted class (research model) = <class concept>
                                   Input series assessment = Recognised as T2-FLAIR / not
                                   Training distribution assessment = Within / Outside
                                     training distribution (s <= threshold: within)
        Measurement group (TID 1410, planar ROI)                    [tracking UID T]
          Finding: Region that most influenced the result (explanation map peak)
          Image region (DCM 111030): SCOORD CIRCLE, centre = the peak pixel's centre, radius
            5 mm, SELECTED FROM the source image (and frame) holding the peak
          Measurement: Explanation map value at peak (0-1, unit "1"), INFERRED FROM the
            Parametric Map (when there is one)
        Measurement group (TID 1410, region in space)               [tracking UID T]
          Finding: as above; SCOORD3D POINT at the peak in LPS mm in the source Frame of
          Reference (no measurements: OHIF would list them twice)

Why every group shares one tracking UID (and identifier text): OHIF merges the groups of one
tracking UID into one measurement and draws it at the first SCOORD of the merged groups,
labelled with the tracking identifier and every NUM (the probabilities). A group without any
SCOORD on its own is processed as a "non-geometric" measurement, which OHIF 3.13 cannot handle
(it warns "...skipping annotation" and then reads ``coords[0]`` of an empty list). So the
classification group never stands alone: when the map is zero everywhere there is no peak and
no peak anchor; the planar group then holds a CIRCLE inscribed in the middle analysed image,
finding "Analysed image (the explanation map is zero everywhere)", which says that the result
is about the series and points at nothing in it.

Codes for the classes. "MS" is SNOMED CT 24700007 *Multiple sclerosis*. We could not confirm a
SNOMED CT concept for cerebral small vessel disease as a whole (SNOMED has specific ones, e.g.
genetic forms, not one we could verify for the umbrella term), so "cSVD" and any other class a
future model may name are coded in the private scheme ``99FLAIRCAD``, declared in the SR's
Coding Scheme Identification Sequence. The probability measurements and the "predicted class"
concept are private for the same reason: no standard concept says "probability of this class
according to a research model". So are the out-of-distribution score and the training
distribution assessment (the model's Mahalanobis check of how far the input lies from its
training data, threshold calibrated on validation data: a warning, not a finding), and the
findings of the anchor and the map value at the peak.

Evidence: every source instance, every Secondary Capture instance and the Parametric Map,
listed in the Current Requested Procedure Evidence Sequence (all are in the source study). The
research-use statement is in the SeriesDescription, the tracking identifier, the device
observer name and the contributing-equipment description.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom
import highdicom.sr as hsr
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS
from service.pipeline.peak import Peak
from service.pipeline.sanitize import clean_ascii, clean_text, clean_uid
from service.pipeline.sc import RESEARCH_STATEMENT, SOFTWARE, ModelIdentity, processing_equipment

PRIVATE_SCHEME = "99FLAIRCAD"
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="flaircad research codes (classes and outputs of flaircad models)",
    responsible_organization="flaircad project",
)
MULTIPLE_SCLEROSIS = hsr.CodedConcept("24700007", "SCT", "Multiple sclerosis")
KNOWN_CLASSES: Mapping[str, hsr.CodedConcept] = {
    "MS": MULTIPLE_SCLEROSIS,
    "CSVD": hsr.CodedConcept("CSVD", PRIVATE_SCHEME, "Cerebral small vessel disease"),
}
PREDICTED_CLASS = hsr.CodedConcept("PREDICTEDCLASS", PRIVATE_SCHEME,
                                   "Predicted class (research model)")
DISTRIBUTION_ASSESSMENT = hsr.CodedConcept("TRAINDIST", PRIVATE_SCHEME,
                                           "Training distribution assessment")
WITHIN_DISTRIBUTION = hsr.CodedConcept("INDIST", PRIVATE_SCHEME, "Within training distribution")
OUTSIDE_DISTRIBUTION = hsr.CodedConcept("OUTDIST", PRIVATE_SCHEME,
                                        "Outside training distribution")
INPUT_ASSESSMENT = hsr.CodedConcept("INPUTSERIES", PRIVATE_SCHEME,
                                    "Input series assessment")
RECOGNISED_FLAIR = hsr.CodedConcept("FLAIR", PRIVATE_SCHEME, "Recognised as T2-FLAIR")
NOT_RECOGNISED_FLAIR = hsr.CodedConcept("NOTFLAIR", PRIVATE_SCHEME,
                                        "Not recognised as T2-FLAIR (research override)")
OOD_SCORE = hsr.CodedConcept("OODSCORE", PRIVATE_SCHEME,
                             "Out-of-distribution score (model output)")
PROCEDURE_REPORTED = hsr.CodedConcept("24590-2", "LN", "Brain MRI")
NO_UNITS = hsr.CodedConcept("1", "UCUM", "no units")
PEAK_REGION = hsr.CodedConcept(
    "EXPLPEAK", PRIVATE_SCHEME, "Region that most influenced the result (explanation map peak)")
WHOLE_IMAGE = hsr.CodedConcept(
    "ANALYSEDIMAGE", PRIVATE_SCHEME, "Analysed image (the explanation map is zero everywhere)")
PEAK_VALUE = hsr.CodedConcept("EXPLPEAKVALUE", PRIVATE_SCHEME, "Explanation map value at peak")
ANCHOR_RADIUS_MM = 5.0
# the attributes TID 1604 (cross-sectional image library descriptors) reads at the top level
_GEOMETRY = ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness")


@dataclass(frozen=True)
class EvidenceInstance:
    """An instance the report rests on (source image, Secondary Capture, Parametric Map)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def class_concept(name: str) -> hsr.CodedConcept:
    """The coded concept for a model class name (see the module docstring)."""
    known = KNOWN_CLASSES.get(name.strip().upper())
    if known is not None:
        return known
    value = clean_ascii(name, 16).upper().replace(" ", "_") or "UNNAMED"
    return hsr.CodedConcept(f"CLASS-{value}"[:16], PRIVATE_SCHEME,
                            clean_text(name, 64) or "unnamed class")


def probability_concept(name: str) -> hsr.CodedConcept:
    value = clean_ascii(name, 16).upper().replace(" ", "_") or "UNNAMED"
    return hsr.CodedConcept(f"PROB-{value}"[:16], PRIVATE_SCHEME,
                            clean_text(f"Probability of {name} (model output)", 64))


def _evidence_dataset(base: Dataset | None, study_uid: str, item: EvidenceInstance) -> Dataset:
    ds = Dataset()
    if base is not None:
        for element in base:
            ds.add(element)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = item.series_instance_uid
    ds.SOPClassUID = item.sop_class_uid
    ds.SOPInstanceUID = item.sop_instance_uid
    return ds


def _library_dataset(item: EvidenceInstance, source: Dataset) -> Dataset:
    """What highdicom's image library reads of a source header, cleaned. Enhanced multi-frame
    images carry their geometry in functional groups, not at the top level that TID 1604
    describes: for them (and any image lacking it) the entry is modality (from the SOP
    class), Frame of Reference, rows and columns; an empty Modality keeps highdicom from
    looking for the rest."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = item.sop_class_uid, item.sop_instance_uid
    frame_of_reference = clean_uid(source.get("FrameOfReferenceUID"))
    if frame_of_reference:
        ds.FrameOfReferenceUID = frame_of_reference
    ds.Rows, ds.Columns = int(source.Rows), int(source.Columns)
    single_frame = int(source.get("NumberOfFrames") or 1) == 1
    if single_frame and all(source.get(k) is not None for k in _GEOMETRY):
        ds.Modality = str(source.get("Modality") or "MR")
        for keyword in (*_GEOMETRY, "SpacingBetweenSlices"):
            if source.get(keyword) is not None:
                setattr(ds, keyword, source.get(keyword))
    else:
        ds.Modality = ""
    return ds


def _image_library(sources: Sequence[EvidenceInstance],
                   source_headers: Sequence[Dataset]) -> list[Dataset]:
    by_uid = {clean_uid(h.get("SOPInstanceUID")): h for h in source_headers}
    return [_library_dataset(item, by_uid[item.sop_instance_uid]) for item in sources
            if item.sop_instance_uid in by_uid and "Rows" in by_uid[item.sop_instance_uid]]


def _circle(centre: tuple[float, float], radius: float, size: tuple[int, int]) -> np.ndarray:
    """CIRCLE graphic data, (column, row) pixel coordinates: the centre, then a point on the
    circle, to the right of the centre unless that leaves the image (then to the left)."""
    x, y = centre
    edge = x + radius if x + radius <= size[1] else x - radius
    return np.array([[x, y], [edge, y]], dtype=np.float64)


def _sop_class(uid: str, fallback: str | None, sources: Sequence[EvidenceInstance]) -> str:
    for item in sources:
        if item.sop_instance_uid == uid:
            return item.sop_class_uid
    if fallback is None:
        raise ValueError("the explanation map's peak is not on a source image of the report")
    return fallback


def _peak_groups(peak: Peak, tracking: hsr.TrackingIdentifier,
                 sources: Sequence[EvidenceInstance], parametric_map: EvidenceInstance | None,
                 frame_of_reference_uid: str | None,
                 ) -> list[hsr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The anchor at the map's peak: a 5 mm circle on its source image (first: OHIF draws the
    first SCOORD of a tracking UID) and, with a Frame of Reference, the point in space."""
    frames = [peak.frame_number] if peak.frame_number is not None else None
    source = hsr.SourceImageForRegion(
        _sop_class(peak.sop_instance_uid, peak.sop_class_uid, sources),
        peak.sop_instance_uid, referenced_frame_numbers=frames)
    radius = ANCHOR_RADIUS_MM / peak.pixel_spacing[1] if peak.pixel_spacing[1] > 0 else 1.0
    region = hsr.ImageRegion(
        graphic_type=hsr.GraphicTypeValues.CIRCLE,
        graphic_data=_circle((peak.column + 0.5, peak.row + 0.5), radius, peak.image_size),
        source_image=source)
    evidence = None if parametric_map is None else [hsr.SourceImageForMeasurement(
        parametric_map.sop_class_uid, parametric_map.sop_instance_uid)]
    value = hsr.Measurement(name=PEAK_VALUE, value=min(max(peak.value, 0.0), 1.0),
                            unit=NO_UNITS, referenced_images=evidence)
    groups = [hsr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=PEAK_REGION,
        measurements=[value])]
    if frame_of_reference_uid:
        point = hsr.ImageRegion3D(graphic_type=hsr.GraphicTypeValues3D.POINT,
                                  graphic_data=np.array([peak.point_lps], dtype=np.float64),
                                  frame_of_reference_uid=frame_of_reference_uid)
        groups.append(hsr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=point, finding_type=PEAK_REGION))
    return groups


def _whole_image_group(tracking: hsr.TrackingIdentifier, sources: Sequence[EvidenceInstance],
                       source_headers: Sequence[Dataset],
                       ) -> list[hsr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """No peak (the map is zero everywhere): a circle inscribed in the middle analysed image,
    so that OHIF still has a geometric measurement to show the classification with (see the
    module docstring). Empty when no source header is at hand."""
    by_uid = {clean_uid(h.get("SOPInstanceUID")): h for h in source_headers}
    known = [item for item in sources
             if item.sop_instance_uid in by_uid and "Rows" in by_uid[item.sop_instance_uid]]
    if not known:
        return []
    item = known[len(known) // 2]
    header = by_uid[item.sop_instance_uid]
    rows, columns = int(header.Rows), int(header.Columns)
    n_frames = int(header.get("NumberOfFrames") or 1)
    frames = [n_frames // 2 + 1] if "NumberOfFrames" in header else None
    region = hsr.ImageRegion(
        graphic_type=hsr.GraphicTypeValues.CIRCLE,
        graphic_data=_circle((columns / 2, rows / 2), min(rows, columns) / 2, (rows, columns)),
        source_image=hsr.SourceImageForRegion(item.sop_class_uid, item.sop_instance_uid,
                                              referenced_frame_numbers=frames))
    return [hsr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=WHOLE_IMAGE)]


def build_report(
    header: Dataset,
    *,
    sources: Sequence[EvidenceInstance],
    secondary_captures: Sequence[EvidenceInstance],
    model: ModelIdentity,
    prediction: str,
    probabilities: Mapping[str, float],
    series_number: int,
    series_instance_uid: str | None = None,
    explanation: str = DEFAULT_EXPLANATION,
    distribution: Mapping[str, Any] | None = None,
    temperature: float | None = None,
    flair_recognised: bool = True,
    parametric_map: EvidenceInstance | None = None,
    peak: Peak | None = None,
    source_headers: Sequence[Dataset] = (),
) -> hsr.Comprehensive3DSR:
    """The Comprehensive 3D SR of one result (content: see the module docstring). ``header``
    is a :func:`service.pipeline.sanitize.reference_header` dataset: the report copies its
    patient and study attributes from there, never from the raw source. ``explanation`` names
    the map; ``distribution`` is the model's distribution assessment
    (:meth:`service.core.contract.DistributionCheck.assess`), reported as a coded evaluation
    with its score; ``temperature`` the calibration temperature (an algorithm parameter).
    ``parametric_map`` is the map's instance (cited by the anchor, listed as evidence);
    ``peak`` the map's maximum (:func:`service.pipeline.peak.peak_of`, None: zero map);
    ``source_headers`` the source instances' headers, for the image library and the
    geometry of the anchor."""
    if not sources:
        raise ValueError("a report needs its source images")
    if explanation not in EXPLANATIONS:
        raise ValueError(f"unknown explanation map {explanation!r}")
    model_name = clean_text(model.name, 64) or "unnamed model"
    model_version = clean_text(model.version, 64) or "unknown"
    parameters = ["target_class=predicted", f"explanation_map={explanation}",
                  "explanation_normalisation=volume"]
    if temperature is not None:
        parameters.append(f"calibration_temperature={float(temperature):.4g}")
    if not flair_recognised:
        parameters.append("accept_non_flair=true")
    if distribution:
        parameters += [f"ood_method={clean_ascii(str(distribution['method']), 48)}",
                       f"ood_threshold={float(distribution['threshold']):.6g}"]
    algorithm = hsr.AlgorithmIdentification(
        name=model_name, version=model_version, parameters=parameters, manufacturer=SOFTWARE,
    )
    measurements = [
        hsr.Measurement(name=probability_concept(name), value=float(p), unit=NO_UNITS,
                        algorithm_id=algorithm)
        for name, p in probabilities.items()
    ]
    evaluations = [hsr.QualitativeEvaluation(name=PREDICTED_CLASS,
                                             value=class_concept(prediction)),
                   hsr.QualitativeEvaluation(name=INPUT_ASSESSMENT, value=RECOGNISED_FLAIR
                                             if flair_recognised else NOT_RECOGNISED_FLAIR)]
    if distribution:
        measurements.append(hsr.Measurement(name=OOD_SCORE, value=float(distribution["score"]),
                                            unit=NO_UNITS, algorithm_id=algorithm))
        evaluations.append(hsr.QualitativeEvaluation(
            name=DISTRIBUTION_ASSESSMENT,
            value=WITHIN_DISTRIBUTION if distribution["in_distribution"]
            else OUTSIDE_DISTRIBUTION))
    device = hsr.DeviceObserverIdentifyingAttributes(
        # one observer UID per model version: the same device for every report it writes
        uid=generate_uid(entropy_srcs=[SOFTWARE, model_name, model_version]),
        name=clean_text(f"{SOFTWARE} (research use only)", 64),
        manufacturer_name=SOFTWARE,
        model_name=model_name,
    )
    context = hsr.ObservationContext(
        observer_device_context=hsr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device,
        ),
    )
    # one tracking UID for the classification and its anchor: OHIF merges them (docstring)
    tracking = hsr.TrackingIdentifier(
        uid=highdicom.UID(),
        identifier=f"MS vs cSVD classification ({SOFTWARE}) - {RESEARCH_STATEMENT}",
    )
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        finding_sites=[hsr.FindingSite(anatomic_location=codes.SCT.Brain)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    anchors: list[hsr.PlanarROIMeasurementsAndQualitativeEvaluations]
    if peak is not None:
        headers = {clean_uid(h.get("SOPInstanceUID")): h for h in source_headers}
        peak_header = headers.get(peak.sop_instance_uid)
        anchors = _peak_groups(
            peak, tracking, sources, parametric_map,
            None if peak_header is None else clean_uid(peak_header.get("FrameOfReferenceUID")))
    else:
        anchors = _whole_image_group(tracking, sources, source_headers)
    library = _image_library(sources, source_headers)
    report = hsr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group, *anchors],
        referenced_images=library or None,
        title=codes.DCM.ImagingMeasurementReport,
        language_of_content_item_and_descendants=hsr.LanguageOfContentItemAndDescendants(
            language=hsr.CodedConcept("en-US", "RFC5646", "English (United States)")
        ),
    )
    study_uid = str(header.StudyInstanceUID)
    # the first evidence item carries the (cleaned) patient and study attributes, which
    # highdicom copies into the report
    cited = [*sources, *secondary_captures, *([parametric_map] if parametric_map else [])]
    evidence = [_evidence_dataset(header if i == 0 else None, study_uid, item)
                for i, item in enumerate(cited)]
    now = datetime.datetime.now()
    return hsr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid or highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[processing_equipment(model, "classification report")],
        series_description=clean_text(f"{SOFTWARE} MS vs cSVD result - RESEARCH ONLY", 64),
        manufacturer_model_name=model_name,
        software_versions=model_version,
        coding_schemes=[CODING_SCHEME],
        specific_character_set=header.SpecificCharacterSet,
        content_date=now.date(),
        content_time=now.time(),
    )
