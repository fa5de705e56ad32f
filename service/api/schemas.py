"""Response bodies, as pydantic models: the contract documented in ``openapi.yaml``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.contract import EXPLANATIONS

RESEARCH_USE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"


class ModelRef(BaseModel):
    name: str
    version: str
    provider: str = Field(description="onnxruntime execution provider actually used")


class Explanation(BaseModel):
    """The map the overlays and the preview show (FLAIRCAD_EXPLANATION)."""

    map: str = Field(description="hirescam (default), gradcam or attention",
                     json_schema_extra={"enum": list(EXPLANATIONS)})
    description: str


class Distribution(BaseModel):
    """The model's check of how far the input lies from its training data: a warning about
    the result, not a finding."""

    in_distribution: bool = Field(description="false: the input is unlike the training data "
                                  "(score above threshold); the result is unreliable")
    score: float = Field(description="the model's ood_score of this input")
    threshold: float = Field(description="from the model metadata, calibrated on validation "
                             "data")
    method: str = Field(description="how the score is computed, e.g. mahalanobis")
    statement: str


class Calibration(BaseModel):
    temperature: float = Field(description="temperature scaling of the logits, already applied "
                               "in the model's probabilities")
    fitted_on: str = ""


class Outputs(BaseModel):
    """The DICOM outputs' UIDs; null for an output FLAIRCAD_OUTPUTS leaves out."""

    secondary_capture_series_instance_uid: str | None = None
    parametric_map_series_instance_uid: str | None = None
    parametric_map_sop_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    sr_series_instance_uid: str | None = None
    instances_url: str
    preview_url: str


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")

    decode: float
    volume: float
    preprocess: float
    inference: float
    render: float
    encode: float
    total: float


class ProblemBody(BaseModel):
    """RFC 9457 problem details; ``code`` is stable, ``type`` is ``urn:flaircad:problem:<code>``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


class AnalysisProblem(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    detail: str


class Delivery(BaseModel):
    """Sending the result (SC series + SR) to one configured destination."""

    destination: str
    kind: Literal["stow", "cstore"]
    state: Literal["pending", "sending", "sent", "failed"]
    attempts: int
    last_error: str | None = Field(None, description="why the last attempt failed")
    instances: int | None = Field(None, description="instances sent, once sent")
    updated: float = Field(description="epoch seconds of the last change")
    next_attempt: float | None = Field(None, description="pending: epoch seconds of the "
                                       "next attempt")


class Analysis(BaseModel):
    """One analysis: its status, and the result once ``status`` is ``done``."""

    model_config = ConfigDict(extra="allow")

    analysis_id: str
    status: Literal["queued", "running", "done", "rejected", "failed"]
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    prediction: str | None = Field(None, description="class with the highest probability")
    probabilities: dict[str, float] | None = Field(
        None, description="per class, names from the model metadata")
    slice_weights: list[float] | None = Field(
        None, description="per source slice, in InstanceNumber order, summing to 1")
    explanation: Explanation | None = None
    distribution: Distribution | None = None
    model: ModelRef | None = None
    calibration: Calibration | None = None
    outputs: Outputs | None = None
    timings_ms: Timings | None = None
    warnings: list[str] = Field(default_factory=list)
    problem: AnalysisProblem | None = Field(None, description="why it was rejected or failed")
    deliveries: list[Delivery] | None = Field(
        None, description="GET /v1/analyses/{id}: sending the result to each configured "
        "destination (FLAIRCAD_DESTINATIONS); absent when there is none")
    intended_use: str = RESEARCH_USE


class AnalysisList(BaseModel):
    analyses: list[Analysis]


class ModelDescription(BaseModel):
    name: str
    version: str
    classes: list[str]
    preprocessing: dict[str, Any]
    provider: str
    providers: list[str]
    intended_use: str
    architecture: dict[str, Any]
    training_summary: dict[str, Any]
    calibration: dict[str, Any] = Field(description="temperature scaling (metadata)")
    out_of_distribution: dict[str, Any] = Field(
        description="the distribution check (metadata): method, threshold")
    explanation: Explanation = Field(description="the map this service shows "
                                     "(FLAIRCAD_EXPLANATION)")


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)
