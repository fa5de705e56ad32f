"""One analysis, DICOM in to result out: the single code path of the HTTP API and the CLI.

A straight line of stages, each timed (milliseconds, in ``timings_ms``):

``decode``
    parse every source once (headers; pixel data stays encoded), group into series; exactly
    one series must remain, and it must be FLAIR (unless the research override is on);
``volume``
    decode the pixels once into a 3D volume with its geometry (:mod:`service.core.volume`);
``preprocess``
    reorient, scale, resize to the model grid (:mod:`service.core.preprocess`);
``inference``
    the one onnxruntime run that yields the probabilities, the explanation maps and the
    out-of-distribution score;
``render``
    overlays of the chosen explanation map (``explanation``: HiResCAM, Grad-CAM or attention,
    :data:`service.core.contract.EXPLANATIONS`) per source slice and the preview montage
    (:mod:`service.pipeline.overlay`);
``encode``
    the Secondary Capture series, the Parametric Map and the SR (:mod:`service.pipeline.sc`,
    :mod:`service.pipeline.pm`, :mod:`service.pipeline.sr`), written to DICOM Part 10 bytes;
``total``
    all of the above.

Input that is not one usable FLAIR MR series raises :class:`AnalysisRejected` with a stable
snake_case ``code``: the codes of :class:`service.core.codes.Code` (``not_mr``, ``missing_slices``,
``not_flair``, ...) plus ``no_series``, ``multiple_series`` and ``invalid_uid``. Anything else
that goes wrong is a bug and propagates as such.

The outputs are written by the storage layer (:func:`service.storage.results.write_outputs`,
which takes any object shaped like :class:`Analysis`): this layer writes no files.

Nothing here logs patient identifiers; warnings name attributes and codes, never values.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset

from service.core.codes import Code
from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS
from service.core.flair import RuleSet, flair_rejection, load_rules, selection_attributes
from service.core.limits import Limits, series_refusal
from service.core.outputs import ALL_OUTPUTS, DicomOutput
from service.core.preprocess import preprocess
from service.core.reading import Source
from service.core.series import Series, ingest
from service.core.volume import SeriesVolume, SliceSource, convert
from service.pipeline import overlay, peak, pm, sanitize, sc, sr
from service.pipeline.engine import EngineOutput, ModelInfo

log = logging.getLogger(__name__)

# the refusal codes of one analysis' input (service.core.codes)
NO_SERIES = Code.NO_SERIES
MULTIPLE_SERIES = Code.MULTIPLE_SERIES
INVALID_UID = Code.INVALID_UID
STAGES = ("decode", "volume", "preprocess", "inference", "render", "encode", "total")
SC_SERIES_OFFSET = 1000  # SC series number = source series number + 1000
SR_SERIES_OFFSET = 2000
PM_SERIES_OFFSET = 3000
_MAX_IS = 2**31 - 1

AnalysisSource = Source | tuple[Source, str]


class InferenceEngine(Protocol):
    """What an analysis needs of :class:`service.pipeline.engine.Engine` (tests pass stand-ins)."""

    info: ModelInfo
    provider: str

    def run(self, volumes: npt.NDArray[np.float32],
            target_class: npt.NDArray[np.int64] | None = None) -> EngineOutput: ...


class AnalysisRejected(Exception):
    """The input is not one usable FLAIR MR series; ``code`` is stable (HTTP 422)."""

    def __init__(self, code: str, message: str, warnings: Sequence[str] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message
        self.warnings = list(warnings)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "warnings": self.warnings}


@dataclass(frozen=True)
class Analysis:
    """The result of one analysis and its DICOM outputs (Part 10 bytes)."""

    study_instance_uid: str
    series_instance_uid: str
    prediction: str  # the class with the highest probability
    probabilities: dict[str, float]  # keys: class names from the model metadata, in order
    slice_weights: list[float]  # per source slice, InstanceNumber order, sums to 1
    explanation: str  # the map the overlays show, a key of contract.EXPLANATIONS
    distribution: dict[str, Any]  # contract.DistributionCheck.assess of the input
    model: dict[str, str]  # name, version, provider
    calibration: dict[str, Any]  # temperature (already applied inside the model), fitted_on
    # The DICOM outputs, each absent (None / []) when FLAIRCAD_OUTPUTS leaves it out
    sc_series_instance_uid: str | None
    sc_sop_instance_uids: list[str]  # InstanceNumber order
    sr_series_instance_uid: str | None
    sr_sop_instance_uid: str | None
    sc_instances: list[bytes]  # one Part 10 file per source slice, InstanceNumber order
    sr_instance: bytes | None
    preview_png: bytes
    timings_ms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    # False: no FLAIR rule matched and the series ran under the non-FLAIR override
    flair_recognised: bool = True
    pm_series_instance_uid: str | None = None
    pm_sop_instance_uid: str | None = None
    pm_instance: bytes | None = None  # the Parametric Map, one frame per source slice

    def instances(self) -> list[bytes]:
        """Every output instance there is: the Secondary Captures, the Parametric Map, then
        the SR (which references the others)."""
        return [*self.sc_instances, *(data for data in (self.pm_instance, self.sr_instance)
                                      if data is not None)]

    def sc_datasets(self) -> list[Dataset]:
        return [dcmread(io.BytesIO(data)) for data in self.sc_instances]

    def sr_dataset(self) -> Dataset:
        if self.sr_instance is None:
            raise LookupError("this analysis produced no SR (FLAIRCAD_OUTPUTS)")
        return dcmread(io.BytesIO(self.sr_instance))

    def pm_dataset(self) -> Dataset:
        if self.pm_instance is None:
            raise LookupError("this analysis produced no Parametric Map (FLAIRCAD_OUTPUTS)")
        return dcmread(io.BytesIO(self.pm_instance))

    def to_json(self) -> dict[str, Any]:
        """The result fields of the API's result JSON; the HTTP layer adds ``analysis_id``,
        ``status`` and the URLs in ``outputs``."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "prediction": self.prediction,
            "probabilities": dict(self.probabilities),
            "slice_weights": list(self.slice_weights),
            "explanation": {"map": self.explanation,
                            "description": EXPLANATIONS[self.explanation]},
            "distribution": dict(self.distribution),
            "input": {"flair_recognised": self.flair_recognised,
                      "statement": "recognised as T2-FLAIR" if self.flair_recognised else
                      "not recognised as T2-FLAIR: analysed under the research override "
                      "(FLAIRCAD_ACCEPT_NON_FLAIR)"},
            "model": dict(self.model),
            "calibration": dict(self.calibration),
            "outputs": {
                "secondary_capture_series_instance_uid": self.sc_series_instance_uid,
                "parametric_map_series_instance_uid": self.pm_series_instance_uid,
                "parametric_map_sop_instance_uid": self.pm_sop_instance_uid,
                "sr_sop_instance_uid": self.sr_sop_instance_uid,
                "sr_series_instance_uid": self.sr_series_instance_uid,
            },
            "timings_ms": dict(self.timings_ms),
            "warnings": list(self.warnings),
        }


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round((now - self.last) * 1000.0, 1)
        self.last = now

    def finish(self) -> dict[str, float]:
        self.timings["total"] = round((time.perf_counter() - self.start) * 1000.0, 1)
        return {stage: self.timings[stage] for stage in STAGES}


def _skipped_summary(codes: Counter[str]) -> str:
    described = ", ".join(f"{code} ({n})" for code, n in sorted(codes.items()))
    return f"{sum(codes.values())} file(s) skipped: {described}"


def _one_series(series: list[Series], warnings: list[str], *, wanted: str | None = None,
                rules: RuleSet | None = None) -> Series:
    """The one series to analyse: the only one, the one whose SeriesInstanceUID is ``wanted``,
    or (given ``rules``) the only one of several that the FLAIR rules recognise."""
    if not series:
        raise AnalysisRejected(NO_SERIES, "no DICOM image series in the input", warnings)
    if wanted is not None:
        chosen = [s for s in series if s.series_instance_uid == wanted]
        if not chosen:
            raise AnalysisRejected(NO_SERIES, f"no series {sanitize.clean_ascii(wanted, 64)} "
                                   f"in the input; it holds: {_listing(series)}", warnings)
        if len(series) > 1:
            warnings.append(f"{len(series)} series in the input; analysed the one asked for")
        return chosen[0]
    if len(series) > 1 and rules is not None:
        flair = [s for s in series if rules.evaluate(selection_attributes(s.first)).is_flair]
        if len(flair) == 1:
            warnings.append(f"{len(series)} series in the input; analysed the only one the "
                            f"FLAIR rules recognise, {flair[0].series_instance_uid}")
            return flair[0]
    if len(series) > 1:
        raise AnalysisRejected(
            MULTIPLE_SERIES,
            f"{len(series)} series in the input; an analysis takes exactly one (flaircad "
            f"analyze --series UID picks one): {_listing(series)}",
            warnings,
        )
    return series[0]


def _listing(series: list[Series]) -> str:
    return "; ".join(
        f"{s.series_instance_uid} ({sanitize.clean_ascii(s.series_description, 64) or '-'},"
        f" {s.n_instances} instance(s))" for s in series[:10])


def _series_number(ds: Dataset, offset: int) -> int:
    try:
        number = int(str(ds.get("SeriesNumber", "")).strip())
    except (TypeError, ValueError):
        number = 0
    return offset + number if 0 <= number <= _MAX_IS - offset else offset


def _display_order(volume: SeriesVolume) -> list[int]:
    """Source slice indices in reading order: InstanceNumber, then frame, then position."""

    def key(k: int) -> tuple[int, int, int, int]:
        s = volume.slices[k]
        missing = s.instance_number is None
        return (int(missing), s.instance_number or 0, s.frame_number or 0, k)

    return sorted(range(len(volume.slices)), key=key)


def _slice_label(volume: SeriesVolume, k: int) -> str:
    s = volume.slices[k]
    label = f"#{s.instance_number}" if s.instance_number is not None else f"slice {k + 1}"
    return label + (f" f{s.frame_number}" if s.frame_number is not None else "")


def _source_images(series: Series, slices: Sequence[SliceSource], order: list[int],
                   warnings: list[str]) -> list[sc.SourceImage]:
    """The source image (and frame) of each output slice; UIDs that cannot be written as UIDs
    make the series unusable (every output references them)."""
    classes: dict[str, str] = {}
    for instance in series.instances:
        uid = sanitize.clean_uid(instance.dataset.get("SOPInstanceUID"))
        sop_class = sanitize.clean_uid(instance.dataset.get("SOPClassUID"))
        if uid is not None and sop_class is not None:
            classes[uid] = sop_class
    images = []
    nonconformant = 0
    for k in order:
        s = slices[k]
        uid = sanitize.clean_uid(s.sop_instance_uid)
        if uid is None or uid not in classes:
            raise AnalysisRejected(
                INVALID_UID, "a source SOP Instance or SOP Class UID is not a valid UID, so the "
                "outputs could not reference it", warnings)
        nonconformant += not sanitize.is_conformant_uid(uid)
        images.append(sc.SourceImage(classes[uid], uid, s.frame_number))
    if nonconformant:
        warnings.append(f"{nonconformant} source SOP Instance UID(s) are not conformant UIDs "
                        "(referenced as they are)")
    return images


def _release_pixel_data(series: Series) -> None:
    """Drop the source pixel bytes once the volume holds them: uncompressed, they cost 2
    bytes a voxel (16-bit) of the analysis' peak memory; nothing after the volume stage reads
    them (the outputs take the headers only)."""
    for instance in series.instances:
        for tag in (0x7FE00008, 0x7FE00009, 0x7FE00010):  # Float, Double Float, Pixel Data
            if tag in instance.dataset:
                del instance.dataset[tag]


def _parametric_map(cam: npt.NDArray[np.float32], series: Series, slices: Sequence[SliceSource],
                    affine_lps: npt.NDArray[np.float64], frame_of_reference_uid: str | None,
                    header: Dataset, *, model: sc.ModelIdentity, explanation: str,
                    series_number: int, warnings: list[str]) -> Dataset | None:
    """The map as a Parametric Map on the source geometry, or None (with a warning) for a
    series that has no Frame of Reference to lay it on: the SC and SR are still made."""
    try:
        return pm.build_parametric_map(
            cam, [i.dataset for i in series.instances], slices, affine_lps,
            frame_of_reference_uid, header, model=model, explanation=explanation,
            series_number=series_number)
    except pm.ParametricMapUnavailable as error:
        warnings.append(f"no Parametric Map: {error}")
        return None


def analyse(
    sources: Iterable[AnalysisSource],
    engine: InferenceEngine,
    *,
    rules: RuleSet | None = None,
    accept_non_flair: bool = False,
    limits: Limits | None = None,
    explanation: str = DEFAULT_EXPLANATION,
    series_uid: str | None = None,
    pick_flair: bool = False,
    outputs: Collection[DicomOutput] = ALL_OUTPUTS,
) -> Analysis:
    """Analyse one FLAIR series given as files / bytes (optionally ``(source, name)`` pairs).
    The overlays and the preview show the map ``explanation`` (a key of
    :data:`service.core.contract.EXPLANATIONS`; anything else is a ValueError, before any work).
    ``series_uid`` picks one series of several; ``pick_flair`` lets several through when the
    FLAIR rules recognise exactly one (what ``flaircad analyze`` does; the HTTP API refuses).
    Raises :class:`AnalysisRejected` when the input is not one usable FLAIR MR series, or one
    larger than ``limits`` allow (checked on the headers, before any pixel is decoded)."""
    if explanation not in EXPLANATIONS:
        raise ValueError(f"unknown explanation map {explanation!r}; one of "
                         f"{sorted(EXPLANATIONS)}")
    clock = _Clock()
    warnings: list[str] = []
    flair_recognised = True

    # decode: parse and group; one series, FLAIR
    ingested = ingest(sources)
    if ingested.skipped:
        warnings.append(_skipped_summary(Counter(str(s.code) for s in ingested.skipped)))
    series = _one_series(ingested.series, warnings, wanted=series_uid,
                         rules=(rules or load_rules()) if pick_flair else None)
    if limits is not None:
        too_large = series_refusal((i.dataset for i in series.instances), limits)
        if too_large is not None:
            raise AnalysisRejected(too_large[0], too_large[1], warnings)
    if series.modality == "MR":  # other modalities are refused by the volume stage (not_mr)
        match = (rules or load_rules()).evaluate(selection_attributes(series.first))
        refusal = flair_rejection(match, accept_non_flair)
        if refusal is not None:
            raise AnalysisRejected(refusal.code, refusal.message, warnings)
        if not match.is_flair:
            flair_recognised = False
            warnings.append(f"{Code.NOT_FLAIR}: no FLAIR rule matched; analysed anyway "
                            "(accept_non_flair research override)")
    clock.lap("decode")

    # volume: decode pixels once, geometry, provenance
    outcome = convert(series)
    warnings.extend(str(notice) for notice in outcome.warnings)
    if outcome.volume is None:
        rejection = outcome.rejection
        assert rejection is not None
        raise AnalysisRejected(rejection.code, rejection.message, warnings)
    volume = outcome.volume
    del outcome  # the volume is referenced from here only (peak memory: see service.core.limits)
    _release_pixel_data(series)
    clock.lap("volume")

    info = engine.info
    prepared = preprocess(volume.array, volume.affine_lps, info.preprocessing)
    clock.lap("preprocess")

    output = engine.run(prepared.model_input[None])
    clock.lap("inference")

    # render: overlays on every source slice, preview of the most attended ones
    probabilities = {name: float(p) for name, p in
                     zip(info.class_names, output.probabilities[0], strict=True)}
    prediction = info.class_names[int(np.argmax(output.probabilities[0]))]
    distribution = info.distribution.assess(float(output.ood_score[0]))
    if not distribution["in_distribution"]:
        warnings.append(
            f"outside the training distribution: {distribution['method']} score "
            f"{distribution['score']} above the threshold {distribution['threshold']}; the "
            "model knows MS and cSVD phantoms only, its result and map are unreliable here")
    label = overlay.explanation_label(explanation)
    banner = overlay.Banner(prediction, probabilities, info.name, info.version,
                            explanation=explanation,
                            in_distribution=bool(distribution["in_distribution"]),
                            flair_recognised=flair_recognised)
    order = _display_order(volume)
    pixel_spacing = (volume.spacing_mm[1], volume.spacing_mm[2])
    rendered = overlay.render(
        volume.array, prepared, output.explanation(explanation)[0], output.slice_weights[0],
        output.spatial_attention[0], banner, display_order=order,
        slice_labels=[_slice_label(volume, k) for k in range(len(volume.slices))],
        pixel_spacing=pixel_spacing,
    )
    if not rendered.cam.any():
        warnings.append(f"the {label} map is zero everywhere: the overlays show no colour")
    weights = np.asarray([rendered.slice_weights[k] for k in order], dtype=np.float64)
    weights = weights / weights.sum()
    images, preview = [rendered.overlays[k] for k in order], rendered.preview_png
    slices, affine_lps = volume.slices, volume.affine_lps
    volume_series_uid = volume.info.series_instance_uid
    frame_of_reference_uid = volume.frame_of_reference_uid
    cam = rendered.cam
    # The float32 volume (4 bytes a voxel) is not needed to encode: freed before the
    # Secondary Captures copy the overlays (peak memory: see service.core.limits); the CAM
    # goes once the Parametric Map holds it.
    del rendered, prepared, volume
    clock.lap("render")

    # encode: Secondary Capture series, Parametric Map and SR, from cleaned copies of the
    # source header
    first = series.instances[0].dataset
    try:
        header = sanitize.reference_header(first)
    except ValueError as error:
        raise AnalysisRejected(INVALID_UID, str(error), warnings) from error
    warnings.extend(header.warnings)
    sources_in_order = _source_images(series, slices, order, warnings)
    model = sc.ModelIdentity(info.name, info.version)
    probabilities_text = ", ".join(f"{name} {p:.3f}" for name, p in probabilities.items())
    chosen = frozenset(outputs)
    if not chosen:
        raise ValueError("at least one DICOM output must be produced")
    parametric_map = None
    if DicomOutput.PM in chosen:
        parametric_map = _parametric_map(
            cam, series, slices, affine_lps, frame_of_reference_uid, header.dataset,
            model=model, explanation=explanation,
            series_number=_series_number(first, PM_SERIES_OFFSET), warnings=warnings)
    # the SR anchors the result at the map's maximum (None: the map is zero everywhere)
    map_peak = peak.peak_of(cam, slices, affine_lps, {
        s.sop_instance_uid: s.sop_class_uid for s in sources_in_order})
    del cam
    captures = [] if DicomOutput.SC not in chosen else sc.build_secondary_captures(
        images, sources_in_order, header.dataset,
        model=model, prediction=prediction, probabilities_text=probabilities_text,
        series_number=_series_number(first, SC_SERIES_OFFSET), pixel_spacing=pixel_spacing,
        orientation=sc.patient_orientation(affine_lps), explanation=explanation,
        distribution=distribution, flair_recognised=flair_recognised,
    )
    del images  # the captures hold the pixels now
    source_series = sanitize.clean_uid(volume_series_uid)
    if not source_series:
        raise AnalysisRejected(INVALID_UID, "the source SeriesInstanceUID is not a valid UID",
                               warnings)
    report = None if DicomOutput.SR not in chosen else sr.build_report(
        header.dataset,
        sources=[sr.EvidenceInstance(sop_class, uid, source_series) for sop_class, uid in
                 dict.fromkeys((s.sop_class_uid, s.sop_instance_uid) for s in sources_in_order)],
        secondary_captures=[sr.EvidenceInstance(c.SOPClassUID, c.SOPInstanceUID,
                                                c.SeriesInstanceUID) for c in captures],
        model=model, prediction=prediction, probabilities=probabilities,
        series_number=_series_number(first, SR_SERIES_OFFSET), explanation=explanation,
        distribution=distribution, temperature=info.calibration.temperature,
        flair_recognised=flair_recognised,
        parametric_map=None if parametric_map is None else sr.EvidenceInstance(
            str(parametric_map.SOPClassUID), str(parametric_map.SOPInstanceUID),
            str(parametric_map.SeriesInstanceUID)),
        peak=map_peak, source_headers=[i.dataset for i in series.instances],
    )
    sc_bytes = sc.encode_series(captures) if captures else []
    pm_bytes = sc.encode_part10(parametric_map) if parametric_map is not None else None
    sr_bytes = sc.encode_part10(report) if report is not None else None
    clock.lap("encode")

    timings = clock.finish()
    log.info("analysis done: %d slices, prediction %s, %s ms", len(order), prediction,
             timings["total"])
    return Analysis(
        study_instance_uid=str(header.dataset.StudyInstanceUID),
        series_instance_uid=str(source_series),
        prediction=prediction,
        probabilities=probabilities,
        slice_weights=[float(w) for w in weights],
        explanation=explanation,
        distribution=distribution,
        flair_recognised=flair_recognised,
        model={"name": info.name, "version": info.version, "provider": engine.provider},
        calibration={"temperature": float(info.calibration.temperature),
                     "fitted_on": info.calibration.fitted_on},
        sc_series_instance_uid=str(captures[0].SeriesInstanceUID) if captures else None,
        sc_sop_instance_uids=[str(c.SOPInstanceUID) for c in captures],
        sr_series_instance_uid=str(report.SeriesInstanceUID) if report is not None else None,
        sr_sop_instance_uid=str(report.SOPInstanceUID) if report is not None else None,
        sc_instances=sc_bytes,
        sr_instance=sr_bytes,
        pm_series_instance_uid=(str(parametric_map.SeriesInstanceUID)
                                if parametric_map is not None else None),
        pm_sop_instance_uid=(str(parametric_map.SOPInstanceUID)
                             if parametric_map is not None else None),
        pm_instance=pm_bytes,
        preview_png=preview,
        timings_ms=timings,
        warnings=warnings,
    )

