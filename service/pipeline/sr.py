"""The result as a DICOM Comprehensive SR: a TID 1500 measurement report (highdicom templates).

Content tree::

    Imaging Measurement Report (DCM 126000)
      Language, observation context: device observer "flaircad" (model name, version)
      Procedure reported: Brain MRI (LN 24590-2)
      Imaging Measurements
        Measurement group (TID 1501)
          Tracking identifier: "MS vs cSVD classification (flaircad) - RESEARCH USE ONLY ..."
          Algorithm identification: model name, version, parameters (target_class=predicted,
            explanation_map=<hirescam|gradcam|attention>, explanation_normalisation=volume,
            calibration_temperature=<T>, ood_method=<method>, ood_threshold=<threshold>)
          Finding site: Brain (SCT 12738006)
          Measurements: Probability of <class> = p, unit UCUM "1" (one per class, metadata order)
                        Out-of-distribution score (model output) = s, unit UCUM "1"
          Qualitative evaluations: Predicted class (research model) = <class concept>
                                   Training distribution assessment = Within / Outside
                                     training distribution (s <= threshold: within)

Codes for the classes. "MS" is SNOMED CT 24700007 *Multiple sclerosis*. We could not confirm a
SNOMED CT concept for cerebral small vessel disease as a whole (SNOMED has specific ones, e.g.
genetic forms, not one we could verify for the umbrella term), so "cSVD" and any other class a
future model may name are coded in the private scheme ``99FLAIRCAD``, declared in the SR's
Coding Scheme Identification Sequence. The probability measurements and the "predicted class"
concept are private for the same reason: no standard concept says "probability of this class
according to a research model". So are the out-of-distribution score and the training
distribution assessment (the model's Mahalanobis check of how far the input lies from its
training data, threshold calibrated on validation data: a warning, not a finding).

Evidence: every source instance and every Secondary Capture instance, listed in the Current
Requested Procedure Evidence Sequence (all are in the source study). The research-use statement
is in the SeriesDescription, the tracking identifier, the device observer name and the
contributing-equipment description.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom
import highdicom.sr as hsr
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS
from service.pipeline.sanitize import clean_ascii, clean_text
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


@dataclass(frozen=True)
class EvidenceInstance:
    """An instance the report rests on (source image or Secondary Capture)."""

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
) -> hsr.ComprehensiveSR:
    """The Comprehensive SR of one result. ``header`` is a
    :func:`service.pipeline.sanitize.reference_header` dataset: the report copies its patient and
    study
    attributes from there, never from the raw source. ``explanation`` names the map of the
    Secondary Captures; ``distribution`` is the model's distribution assessment
    (:meth:`service.core.contract.DistributionCheck.assess`), reported as a coded evaluation with
    its
    score; ``temperature`` the calibration temperature (an algorithm parameter)."""
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
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=highdicom.UID(),
            identifier=f"MS vs cSVD classification ({SOFTWARE}) - {RESEARCH_STATEMENT}",
        ),
        algorithm_id=algorithm,
        finding_sites=[hsr.FindingSite(anatomic_location=codes.SCT.Brain)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    report = hsr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
        language_of_content_item_and_descendants=hsr.LanguageOfContentItemAndDescendants(
            language=hsr.CodedConcept("en-US", "RFC5646", "English (United States)")
        ),
    )
    study_uid = str(header.StudyInstanceUID)
    # the first evidence item carries the (cleaned) patient and study attributes, which
    # highdicom copies into the report
    evidence = [_evidence_dataset(header if i == 0 else None, study_uid, item)
                for i, item in enumerate([*sources, *secondary_captures])]
    now = datetime.datetime.now()
    return hsr.ComprehensiveSR(
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
