"""End to end on a tiny phantom cohort: train 2 epochs per fold, export, run in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export import export as export_module
from model_export import train
from model_export.data import make_splits, stratified_group_folds
from service.core.preprocess import PreprocessingConfig
from service.pipeline.engine import Engine

TINY_SHAPE = ["64", "64", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = train.main(["--phantoms", "12", "--config", "tiny", "--folds", "3", "--epochs", "2",
                       "--target-shape", *TINY_SHAPE, "--threads", "2", "--out", str(out)])
    assert code == 0
    return out


def test_training_writes_metrics_per_fold_and_summary(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["folds"] == 3 and len(metrics["per_fold"]) == 3
    assert metrics["n_patients"] == 12
    for fold in metrics["per_fold"]:
        test = fold["test"]
        for key in ("balanced_accuracy", "balanced_accuracy_chance_adjusted", "auc",
                    "sensitivity", "specificity", "cam_peak_in_lesion"):
            assert key in test
        assert test["balanced_accuracy_chance_adjusted"] == pytest.approx(
            2 * test["balanced_accuracy"] - 1)
        assert 1 <= len(fold["history"]) <= 2
    summary = metrics["test_mean_sd"]
    assert set(summary["auc"]) == {"mean", "sd"}
    checkpoint = torch.load(trained / "model.pt", weights_only=True)
    assert checkpoint["model_config"]["depth"] == 18
    assert PreprocessingConfig.from_json(checkpoint["preprocessing"]).model_grid == (8, 64, 64)


def test_splits_are_per_patient_and_stratified() -> None:
    labels = [0, 0, 1, 1] * 6 + [0, 1]
    groups = [f"p{i // 2}" for i in range(24)] + ["p99", "p99"]  # two series per patient
    folds = stratified_group_folds(labels, groups, 3, seed=0)
    assert sorted(i for fold in folds for i in fold) == list(range(26))
    for fold in folds:
        patients = {groups[i] for i in fold}
        others = {groups[i] for other in folds if other is not fold for i in other}
        assert not patients & others  # no patient in two folds
    for split in make_splits(labels, groups, 3, seed=0):
        sets = [{groups[i] for i in part} for part in (split.train, split.valid, split.test)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert {labels[i] for i in split.test} == {0, 1}


def test_export_writes_a_verified_self_contained_model(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    assert export_module.main([str(trained / "model.pt"), "--out", str(out)]) == 0
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    for key in ("class_names", "preprocessing", "model_version", "architecture",
                "training_summary", "intended_use", "source_checkpoint_sha256"):
        assert key in meta
    assert json.loads(meta["class_names"]) == ["MS", "cSVD"]
    assert "research use only" in meta["intended_use"]
    assert PreprocessingConfig.from_json(meta["preprocessing"]).target_shape == (64, 64, 8)

    engine = Engine(out, ["CPUExecutionProvider"])
    assert engine.provider == "CPUExecutionProvider"
    volumes = np.random.default_rng(0).random((2, 11, 64, 64), dtype=np.float32)
    result = engine.run(volumes, np.array([-1, 1]))
    assert result.probabilities.shape == (2, 2)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, rtol=1e-5)
    grid = 64 // train.PRESETS["tiny"][0].feature_stride
    assert result.gradcam.shape == result.spatial_attention.shape == (2, 11, grid, grid)
    np.testing.assert_allclose(result.slice_weights.sum(1), 1.0, rtol=1e-5)


def test_export_refuses_a_model_that_fails_verification(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "PROBABILITY_TOLERANCE", -1.0)
    out = tmp_path / "refused.onnx"
    assert export_module.main([str(trained / "model.pt"), "--out", str(out)]) == 1
    assert not out.exists()


def test_exported_target_class_selects_the_gradcam_class(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    export_module.main([str(trained / "model.pt"), "--out", str(out)])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    volume = np.random.default_rng(1).random((1, 8, 1, 64, 64), dtype=np.float32)
    names = ["probabilities", "gradcam", "hirescam"]

    def run(target: int) -> list[np.ndarray]:
        return session.run(names, {"volume": volume, "target_class": np.array([target])})

    probs, *maps_pred = run(-1)
    predicted = int(probs.argmax())
    _, *maps_explicit = run(predicted)
    _, *maps_other = run(1 - predicted)
    for pred, explicit, other in zip(maps_pred, maps_explicit, maps_other, strict=True):
        np.testing.assert_array_equal(pred, explicit)
        assert not np.allclose(pred, other)
