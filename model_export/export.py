"""Export a checkpoint to ONE self-contained ONNX file that also computes its explanations.

    python -m model_export.export runs/demo/model.pt --out service/models/flaircad-demo.onnx

The graph (``service.core.contract.OUTPUT_NAMES``) gives calibrated probabilities, the attention,
HiResCAM and Grad-CAM for ``target_class``, and the distance from the training data. The export
verifies itself in onnxruntime against PyTorch at several (batch, slices) shapes and refuses to
write a model that misses the bounds: probabilities and attention max |Δ| ≤ 1e-5, distance
relative ≤ 1e-4, HiResCAM and Grad-CAM correlation with autograd's ≥ 0.9999.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model_export.model import (
    AttentionClassifier,
    EmbeddingDistance,
    ExplainedClassifier,
    ModelConfig,
    autograd_maps,
    embedding_dim,
    volume_embedding,
)
from service.core.contract import (
    CHECKPOINT_FORMAT,
    INPUT_NAMES,
    INTENDED_USE,
    OUTPUT_NAMES,
    CheckpointKey,
    Input,
    Meta,
    Output,
    PreprocessingConfig,
    io_descriptions,
)
from service.core.preprocess import preprocess, resize_area
from service.phantoms import generate_phantom

OPSET = 18
PROBABILITY_TOLERANCE = 1e-5
# the distance sums squares over a whitened embedding in float32: relative, and looser
DISTANCE_RELATIVE_TOLERANCE = 1e-4
GRADCAM_MIN_CORRELATION = 0.9999
# (batch, slices) pairs the exported graph is checked at; the model's own grid comes first.
CHECK_SHAPES = ((1, None), (2, None), (1, 7), (3, 31))


class ExportVerificationError(RuntimeError):
    """The ONNX graph does not reproduce PyTorch within the bounds; nothing was written."""


@dataclass(frozen=True)
class Checkpoint:
    model: AttentionClassifier
    explained: ExplainedClassifier
    calibration: dict[str, Any]
    out_of_distribution: dict[str, Any]
    class_names: list[str]
    preprocessing: PreprocessingConfig
    training_summary: dict[str, Any]
    sha256: str


def load_checkpoint(path: Path) -> Checkpoint:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if raw.get(CheckpointKey.FORMAT) != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    model = AttentionClassifier(ModelConfig(**raw[CheckpointKey.MODEL_CONFIG]))
    model.load_state_dict(raw[CheckpointKey.STATE_DICT])
    model.eval()
    distance = EmbeddingDistance(embedding_dim(model.config), model.config.num_classes)
    if raw[CheckpointKey.DISTANCE_STATE]["means"].shape != distance.means.shape:
        raise ValueError(f"{path}: its distance was fitted on another embedding than "
                         "model.volume_embedding gives; refit it (python -m "
                         "model_export.recalibrate)")
    distance.load_state_dict(raw[CheckpointKey.DISTANCE_STATE])
    explained = ExplainedClassifier(model, raw[CheckpointKey.TEMPERATURE], distance).eval()
    return Checkpoint(
        model=model,
        explained=explained,
        calibration=dict(raw[CheckpointKey.CALIBRATION]),
        out_of_distribution=dict(raw[CheckpointKey.OUT_OF_DISTRIBUTION]),
        class_names=list(raw[CheckpointKey.CLASS_NAMES]),
        preprocessing=PreprocessingConfig.from_json(raw[CheckpointKey.PREPROCESSING]),
        training_summary=raw[CheckpointKey.TRAINING_SUMMARY],
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def check_volumes(preprocessing: PreprocessingConfig) -> torch.Tensor:
    """Realistic inputs for verification: two preprocessed phantoms (one per class)."""
    volumes = []
    for label, seed in (("MS", 900_001), ("cSVD", 900_002)):
        phantom = generate_phantom(label, seed)
        volumes.append(preprocess(phantom.volume, phantom.affine, preprocessing).model_input)
    return torch.from_numpy(np.stack(volumes))


def verification_inputs(
    preprocessing: PreprocessingConfig,
) -> list[tuple[np.ndarray, np.ndarray]]:
    base = check_volumes(preprocessing).numpy()
    slices, height, width = preprocessing.model_grid
    cases = []
    for case, (batch, n_slices) in enumerate(CHECK_SHAPES):
        n_slices = n_slices or slices
        items = [
            resize_area(base[(case + b) % len(base)], (n_slices, height, width))
            for b in range(batch)
        ]
        volume = np.stack(items)[:, :, None].astype(np.float32)
        # −1 (predicted) and explicit classes, so both paths of the target selection are run
        target = np.array([(-1, 0, 1)[(case + b) % 3] for b in range(batch)], dtype=np.int64)
        cases.append((volume, target))
    return cases


def _correlation(reference: np.ndarray, exported: np.ndarray) -> float:
    reference, exported = reference.ravel(), exported.ravel()
    if reference.std() == 0 and exported.std() == 0:
        return 1.0 if np.allclose(reference, exported, atol=1e-6) else 0.0
    return float(np.corrcoef(reference, exported)[0, 1])


def verify(onnx_path: Path, explained: ExplainedClassifier,
           preprocessing: PreprocessingConfig) -> list[dict[str, Any]]:
    """Every output against PyTorch: the maps against autograd's, not against the same
    hand-written backward that the graph holds."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = explained.model
    report = []
    for volume, target in verification_inputs(preprocessing):
        got = dict(zip(OUTPUT_NAMES, session.run(
            list(OUTPUT_NAMES), {Input.VOLUME.value: volume, Input.TARGET_CLASS.value: target}),
            strict=True))
        maps = autograd_maps(model, torch.from_numpy(volume), torch.from_numpy(target))
        with torch.no_grad():
            logits = maps.out.logits / explained.temperature
            distance = explained.distance(volume_embedding(maps.out)).numpy()
        reference = {
            Output.PROBABILITIES.value: torch.softmax(logits, -1).detach().numpy(),
            Output.SLICE_WEIGHTS.value: maps.out.slice_weights.detach().numpy(),
            Output.SPATIAL_ATTENTION.value: maps.out.spatial_attention.detach().numpy(),
        }
        entry: dict[str, Any] = {"shape": list(volume.shape[:2]),
                                 Input.TARGET_CLASS.value: target.tolist()}
        for name, value in reference.items():
            entry[f"{name}_max_abs_diff"] = float(np.abs(got[name] - value).max())
        entry["ood_score_max_rel_diff"] = float(
            (np.abs(got[Output.OOD_SCORE] - distance) / np.maximum(np.abs(distance), 1.0)).max())
        entry["gradcam_correlation"] = _correlation(maps.gradcam.numpy(), got[Output.GRADCAM])
        entry["hirescam_correlation"] = _correlation(maps.hirescam.numpy(),
                                                     got[Output.HIRESCAM])
        report.append(entry)
        close = all(entry[f"{name}_max_abs_diff"] <= PROBABILITY_TOLERANCE for name in reference)
        close = close and entry["ood_score_max_rel_diff"] <= DISTANCE_RELATIVE_TOLERANCE
        maps_agree = min(entry["gradcam_correlation"],
                         entry["hirescam_correlation"]) >= GRADCAM_MIN_CORRELATION
        if not (close and maps_agree):
            raise ExportVerificationError(f"ONNX does not match PyTorch: {entry}")
    return report


def export_onnx(checkpoint: Checkpoint, out: Path, model_name: str, model_version: str,
                allow_padding_frame: bool = False) -> dict[str, Any]:
    """Export, attach metadata, verify; ``out`` is written only when everything holds."""
    wrapper = checkpoint.explained
    offset_mismatch = checkpoint.model.config.input_offset != checkpoint.preprocessing.background
    if offset_mismatch and not allow_padding_frame:
        raise ExportVerificationError(
            f"the network's input offset {checkpoint.model.config.input_offset} is not the "
            f"preprocessing's background {checkpoint.preprocessing.background}: its zero "
            "padding would not be air")
    slices, height, width = checkpoint.preprocessing.model_grid
    example = (torch.rand(1, slices, 1, height, width), torch.tensor([-1]))
    batch = torch.export.Dim("batch", min=1, max=256)
    n_slices = torch.export.Dim("slices", min=1, max=1024)
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(
            wrapper, example, dynamo=True, opset_version=OPSET, external_data=False,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes={Input.VOLUME.value: {0: batch, 1: n_slices},
                            Input.TARGET_CLASS.value: {0: batch}},
            verbose=False,
        )
        if program is None:  # the legacy exporter's answer; dynamo=True returns a program
            raise ExportVerificationError("torch.onnx.export returned no ONNX program")
        proto = program.model_proto
        metadata = {
            Meta.NAME.value: model_name,
            Meta.MODEL_VERSION.value: model_version,
            Meta.CLASS_NAMES.value: json.dumps(checkpoint.class_names),
            Meta.PREPROCESSING.value: checkpoint.preprocessing.to_json(),
            Meta.ARCHITECTURE.value: json.dumps({
                "description": checkpoint.model.config.describe(),
                **checkpoint.model.config.to_dict(),
                "feature_stride": checkpoint.model.config.feature_stride,
                "gradcam_layer": f"backbone.layer{checkpoint.model.config.output_stage}",
                "hirescam_layer": f"backbone.layer{checkpoint.model.config.output_stage}",
                # air != the padding value: zero padding draws a frame the features answer to
                "padding_frame": offset_mismatch,
            }, sort_keys=True),
            Meta.TRAINING_SUMMARY.value: json.dumps(checkpoint.training_summary, sort_keys=True),
            Meta.INTENDED_USE.value: INTENDED_USE,
            Meta.SOURCE_CHECKPOINT_SHA256.value: checkpoint.sha256,
            Meta.CALIBRATION.value: json.dumps(checkpoint.calibration, sort_keys=True),
            Meta.OUT_OF_DISTRIBUTION.value: json.dumps(checkpoint.out_of_distribution,
                                                       sort_keys=True),
            Meta.OUTPUTS.value: json.dumps(io_descriptions(), sort_keys=True),
        }
        del proto.metadata_props[:]
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        proto.producer_name = "flaircad.model_export"
        proto.doc_string = f"{model_name} {model_version}: {INTENDED_USE}"
        onnx.checker.check_model(proto, full_check=True)
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(proto, staged)
        report = verify(staged, wrapper, checkpoint.preprocessing)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, out)
    return {"out": str(out), "bytes": out.stat().st_size, "verification": report,
            "metadata_keys": sorted(metadata)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_export.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="flaircad-demo")
    p.add_argument("--model-version", help="default: 0.1.0+<checkpoint sha256[:12]>")
    p.add_argument("--allow-padding-frame", action="store_true",
                   help="export a network whose input offset is not the background (a "
                        "recalibrated format-1 network); the architecture metadata says so")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    checkpoint = load_checkpoint(args.checkpoint)
    version = args.model_version or f"0.1.0+{checkpoint.sha256[:12]}"
    try:
        result = export_onnx(checkpoint, args.out, args.name, version,
                             allow_padding_frame=args.allow_padding_frame)
    except ExportVerificationError as error:
        print(f"export refused: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
