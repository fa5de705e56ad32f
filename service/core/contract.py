"""The ONNX contract between ``model_export`` (which writes it) and the service (which reads it).

One module, torch-free: the input and output names (:class:`Input`, :class:`Output`, each with
the description the model's ``outputs`` metadata carries), the metadata keys (:class:`Meta`) and
how each parses (:class:`ModelInfo`), the preprocessing parameters (:class:`PreprocessingConfig`,
run by :mod:`service.core.preprocess`), the explanation maps a model offers and the training
checkpoint's format (:class:`CheckpointKey`). The export imports these names to build the
graph; the engine imports them to check a model file before it serves it. Nothing else spells
them out (``tests/unit/test_contract.py`` checks it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal


class _Described(StrEnum):
    """A name of the contract that carries its own one-line description."""

    description: str

    def __new__(cls, value: str, description: str = "") -> _Described:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member


class Input(_Described):
    VOLUME = "volume", "(B, S, 1, H, W) float32 on the model grid, in [0, 1]"
    TARGET_CLASS = "target_class", "(B,) int64, -1 = predicted class"


class Output(_Described):
    """The graph's outputs, in the order the engine unpacks them."""

    PROBABILITIES = (
        "probabilities",
        "(B, K) calibrated softmax (logits / temperature), order of class_names")
    LOGITS = "logits", "(B, K) calibrated logits: network logits / temperature"
    SLICE_WEIGHTS = "slice_weights", "(B, S) gated attention over slices, sums to 1"
    SPATIAL_ATTENTION = (
        "spatial_attention", "(B, S, h, w) per-slice attention, sums to 1 per slice")
    GRADCAM = (
        "gradcam",
        "(B, S, h, w) ReLU Grad-CAM of target_class at gradcam_layer, unnormalised "
        "(comparable across the slices of a volume)")
    HIRESCAM = (
        "hirescam",
        "(B, S, h, w) ReLU HiResCAM (gradient x features, summed over channels) of "
        "target_class at gradcam_layer, unnormalised")
    OOD_SCORE = (
        "ood_score",
        "(B,) Mahalanobis distance of the volume embedding to the nearest training class mean; "
        "above out_of_distribution.threshold the input is unlike the training data")


class Meta(StrEnum):
    """ONNX metadata_props keys; the values of JSON keys are JSON text."""

    NAME = "name"  # optional: the file's stem otherwise
    MODEL_VERSION = "model_version"
    CLASS_NAMES = "class_names"  # JSON list
    PREPROCESSING = "preprocessing"  # JSON: PreprocessingConfig
    ARCHITECTURE = "architecture"  # JSON
    TRAINING_SUMMARY = "training_summary"  # JSON
    INTENDED_USE = "intended_use"
    SOURCE_CHECKPOINT_SHA256 = "source_checkpoint_sha256"
    CALIBRATION = "calibration"  # JSON: Calibration
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # JSON: DistributionCheck
    OUTPUTS = "outputs"  # JSON: io_descriptions(), for people reading the file


# plain strings (not the members) for onnxruntime, torch.onnx and messages
INPUT_NAMES: tuple[str, str] = (Input.VOLUME.value, Input.TARGET_CLASS.value)
OUTPUT_NAMES: tuple[str, ...] = tuple(o.value for o in Output)
REQUIRED_METADATA: tuple[str, ...] = tuple(m.value for m in (
    Meta.CLASS_NAMES, Meta.PREPROCESSING, Meta.MODEL_VERSION, Meta.ARCHITECTURE,
    Meta.TRAINING_SUMMARY, Meta.INTENDED_USE, Meta.SOURCE_CHECKPOINT_SHA256, Meta.CALIBRATION,
    Meta.OUT_OF_DISTRIBUTION))
INTENDED_USE = "research use only, not for diagnosis"


def io_descriptions() -> dict[str, str]:
    """What the ``outputs`` metadata says about every output and the ``target_class`` input."""
    described = {o.value: o.description for o in Output}
    described[Input.TARGET_CLASS.value] = Input.TARGET_CLASS.description
    return described


class CheckpointKey(StrEnum):
    """The keys of a training checkpoint (``torch.save`` of a dict), :data:`CHECKPOINT_FORMAT`."""

    FORMAT = "format"
    MODEL_CONFIG = "model_config"
    STATE_DICT = "state_dict"
    TEMPERATURE = "temperature"
    DISTANCE_STATE = "distance_state"
    CALIBRATION = "calibration"
    OUT_OF_DISTRIBUTION = "out_of_distribution"
    CLASS_NAMES = "class_names"
    PREPROCESSING = "preprocessing"  # PreprocessingConfig.to_json()
    TRAINING_SUMMARY = "training_summary"


CHECKPOINT_FORMAT = "flaircad-checkpoint/2"


class Explanation(StrEnum):
    """Explanation maps the service can show (FLAIRCAD_EXPLANATION)."""

    HIRESCAM = Output.HIRESCAM.value
    GRADCAM = Output.GRADCAM.value
    ATTENTION = "attention"  # spatial_attention weighted by slice_weights


# what each explanation map is
EXPLANATIONS: dict[str, str] = {
    Explanation.HIRESCAM.value: "HiResCAM (gradient x features, summed over channels) of the "
    "predicted class",
    Explanation.GRADCAM.value: "Grad-CAM (channel-mean gradient x features) of the predicted class",
    Explanation.ATTENTION.value: "the model's spatial attention weighted by its slice attention",
}
DEFAULT_EXPLANATION: str = Explanation.HIRESCAM.value

CANONICAL_ORIENTATION = "SPL"


@dataclass(frozen=True)
class PreprocessingConfig:
    """What the model expects; travels in the ONNX metadata under ``preprocessing`` (run by
    :func:`service.core.preprocess.preprocess`)."""

    target_shape: tuple[int, int, int] = (256, 256, 24)  # (H, W, S), as the paper states it
    orientation: str = CANONICAL_ORIENTATION
    intensity: dict[str, Any] = field(
        default_factory=lambda: {"method": "minmax", "percentiles": [0.0, 100.0]}
    )
    interpolation: Literal["area"] = "area"
    # The value air (the darkest voxels, which min–max maps to 0) has in ``model_input``. The
    # network subtracts it before its first convolution (``input_offset`` in the architecture
    # metadata), so that outside the image and outside the head are the same thing to it: its
    # zero padding then continues the air instead of drawing a frame around every slice.
    background: float = 0.0

    def __post_init__(self) -> None:
        if len(self.target_shape) != 3 or min(self.target_shape) < 1:
            raise ValueError(f"target_shape must be three positive sizes, got {self.target_shape}")
        if self.orientation != CANONICAL_ORIENTATION:
            raise ValueError(f"only orientation {CANONICAL_ORIENTATION!r} is implemented")
        if self.interpolation != "area":
            raise ValueError("only area interpolation is implemented")
        if self.intensity.get("method") != "minmax":
            raise ValueError("only min–max intensity scaling is implemented")
        low, high = self.intensity.get("percentiles", [0.0, 100.0])
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"intensity percentiles need 0 <= low < high <= 100: {low, high}")

    @property
    def model_grid(self) -> tuple[int, int, int]:
        """(S, H, W): the array shape the model's ``volume`` input takes per item."""
        height, width, slices = self.target_shape
        return slices, height, width

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessingConfig:
        raw = json.loads(text)
        return cls(
            target_shape=tuple(int(v) for v in raw["target_shape"]),  # type: ignore[arg-type]
            orientation=raw["orientation"],
            intensity=dict(raw["intensity"]),
            interpolation=raw["interpolation"],
            background=float(raw.get("background", 0.0)),
        )


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
                name=metadata.get(Meta.NAME, fallback_name),
                version=metadata[Meta.MODEL_VERSION],
                class_names=tuple(json.loads(metadata[Meta.CLASS_NAMES])),
                preprocessing=PreprocessingConfig.from_json(metadata[Meta.PREPROCESSING]),
                architecture=json.loads(metadata[Meta.ARCHITECTURE]),
                training_summary=json.loads(metadata[Meta.TRAINING_SUMMARY]),
                intended_use=metadata[Meta.INTENDED_USE],
                source_checkpoint_sha256=metadata[Meta.SOURCE_CHECKPOINT_SHA256],
                calibration=Calibration.from_json(metadata[Meta.CALIBRATION]),
                distribution=DistributionCheck.from_json(metadata[Meta.OUT_OF_DISTRIBUTION]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ModelContractError(f"model metadata does not parse: {error}") from error


def check_signature(inputs: set[str], outputs: set[str]) -> None:
    if inputs != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= outputs:
        raise ModelContractError(f"unexpected model signature: {inputs} -> {outputs}")
