"""The ONNX contract between ``model_export`` (which writes it) and the service (which reads it).

One module, torch-free: input and output names, the metadata keys and how each parses, and the
explanation maps a model offers. The export imports these names to build the graph; the engine
imports them to check a model file before it serves it. Nothing else spells them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service.core.preprocess import PreprocessingConfig

INPUT_NAMES: tuple[str, str] = ("volume", "target_class")
OUTPUT_NAMES: tuple[str, ...] = (
    "probabilities",  # (B, K) calibrated softmax (temperature in the metadata), class order
    "logits",  # (B, K) calibrated logits: the network's logits divided by the temperature
    "slice_weights",  # (B, S) gated attention over slices, sums to 1
    "spatial_attention",  # (B, S, h, w) per-slice attention over positions, sums to 1 per slice
    "gradcam",  # (B, S, h, w) ReLU Grad-CAM of target_class (kept to compare with the paper)
    "hirescam",  # (B, S, h, w) ReLU HiResCAM of target_class: sum_c dy/dF_c * F_c
    "ood_score",  # (B,) distance of the volume's embedding from the training data
)
CHECKPOINT_FORMAT = "flaircad-checkpoint/2"

# Metadata keys (ONNX metadata_props); the values of JSON keys are JSON text.
REQUIRED_METADATA = ("class_names", "preprocessing", "model_version", "architecture",
                     "training_summary", "intended_use", "source_checkpoint_sha256",
                     "calibration", "out_of_distribution")
INTENDED_USE = "research use only, not for diagnosis"

# Explanation maps the service can show (FLAIRCAD_EXPLANATION), and what each one is.
EXPLANATIONS: dict[str, str] = {
    "hirescam": "HiResCAM (gradient x features, summed over channels) of the predicted class",
    "gradcam": "Grad-CAM (channel-mean gradient x features) of the predicted class",
    "attention": "the model's spatial attention weighted by its slice attention",
}
DEFAULT_EXPLANATION = "hirescam"


class ModelContractError(ValueError):
    """The ONNX file does not carry the inputs, outputs or metadata flaircad relies on."""


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling fitted on the validation split, already applied inside the graph."""

    temperature: float = 1.0
    fitted_on: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        raw = json.loads(text)
        temperature = float(raw["temperature"])
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return cls(temperature, str(raw.get("fitted_on", "")), dict(raw))


@dataclass(frozen=True)
class DistributionCheck:
    """How ``ood_score`` reads: above ``threshold`` the input is unlike the training data."""

    method: str
    threshold: float
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> DistributionCheck:
        raw = json.loads(text)
        return cls(str(raw["method"]), float(raw["threshold"]), dict(raw))

    def assess(self, score: float) -> dict[str, Any]:
        """The result's ``distribution`` assessment for one input."""
        inside = bool(score <= self.threshold)
        return {
            "in_distribution": inside,
            "score": round(float(score), 4),
            "threshold": round(self.threshold, 4),
            "method": self.method,
            "statement": "within the training distribution" if inside
            else "outside the training distribution",
        }


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    class_names: tuple[str, ...]
    preprocessing: PreprocessingConfig
    architecture: dict[str, Any]
    training_summary: dict[str, Any]
    intended_use: str
    source_checkpoint_sha256: str
    calibration: Calibration
    distribution: DistributionCheck

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], fallback_name: str) -> ModelInfo:
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ModelContractError(f"model metadata lacks {missing}")
        try:
            return cls(
                name=metadata.get("name", fallback_name),
                version=metadata["model_version"],
                class_names=tuple(json.loads(metadata["class_names"])),
                preprocessing=PreprocessingConfig.from_json(metadata["preprocessing"]),
                architecture=json.loads(metadata["architecture"]),
                training_summary=json.loads(metadata["training_summary"]),
                intended_use=metadata["intended_use"],
                source_checkpoint_sha256=metadata["source_checkpoint_sha256"],
                calibration=Calibration.from_json(metadata["calibration"]),
                distribution=DistributionCheck.from_json(metadata["out_of_distribution"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ModelContractError(f"model metadata does not parse: {error}") from error


def check_signature(inputs: set[str], outputs: set[str]) -> None:
    if inputs != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= outputs:
        raise ModelContractError(f"unexpected model signature: {inputs} -> {outputs}")
