"""The bundled demo model: loads in onnxruntime, carries its contract, matches its checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import onnx
import pytest

from model_export.export import verify
from service.core.config import BUNDLED_MODEL
from service.core.preprocess import preprocess
from service.phantoms import generate_phantom
from service.pipeline.engine import Engine, ModelContractError
from tests.conftest import REPO

CHECKPOINT = REPO / "model_export" / "checkpoints" / "flaircad-demo.pt"


@pytest.fixture(scope="module")
def engine() -> Engine:
    assert BUNDLED_MODEL.is_file(), "service/models/flaircad-demo.onnx is missing: run make model"
    return Engine(BUNDLED_MODEL, ["CPUExecutionProvider"])


def test_bundled_model_is_small_and_self_contained() -> None:
    assert BUNDLED_MODEL.stat().st_size <= 20 * 2**20
    proto = onnx.load(str(BUNDLED_MODEL), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert proto.opset_import[0].version >= 17


def test_bundled_metadata_parses(engine: Engine) -> None:
    info = engine.info
    assert info.class_names == ("MS", "cSVD")
    assert info.preprocessing.target_shape == (256, 256, 24)
    assert info.preprocessing.orientation == "SPL"
    assert "research use only" in info.intended_use
    assert info.architecture["depth"] == 18
    summary = info.training_summary
    assert summary["test"]["auc"] >= 0.5 and "balanced_accuracy_chance_adjusted" in summary["test"]
    assert summary["split"].endswith("by patient, 60/20/20")
    assert len(info.source_checkpoint_sha256) == 64
    # air is 0 for the network, so the convolutions' zero padding continues it (no frame),
    # and the metadata says so rather than leaving it to be assumed
    assert info.preprocessing.background == 0.0
    assert info.architecture["input_offset"] == info.preprocessing.background
    assert info.architecture["padding_frame"] is False
    assert 0.05 < info.calibration.temperature < 20 and "validation" in info.calibration.fitted_on
    assert info.distribution.method == "mahalanobis" and info.distribution.threshold > 0
    assert set(summary["seeds"]) >= {"classifier", "pretrain", "export_check"}


def test_bundled_model_runs_and_is_dynamic_in_batch_and_slices(engine: Engine) -> None:
    phantom = generate_phantom("cSVD", 424_242)
    volume = preprocess(phantom.volume, phantom.affine, engine.info.preprocessing).model_input
    out = engine.run(np.stack([volume[:20], volume[4:]]))  # 20 slices, not the grid's 24
    assert out.probabilities.shape == (2, 2) and out.gradcam.shape[:2] == (2, 20)
    np.testing.assert_allclose(out.probabilities.sum(1), 1.0, rtol=1e-5)
    assert out.gradcam.max() > 0


def test_bundled_model_matches_its_checkpoint_within_the_parity_bounds() -> None:
    from model_export.export import load_checkpoint

    meta = {p.key: p.value for p in onnx.load(str(BUNDLED_MODEL)).metadata_props}
    assert hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() == meta["source_checkpoint_sha256"]
    checkpoint = load_checkpoint(CHECKPOINT)
    report = verify(BUNDLED_MODEL, checkpoint.explained, checkpoint.preprocessing)
    for r in report:  # every exported map, against autograd
        assert r["probabilities_max_abs_diff"] <= 1e-5
        assert r["spatial_attention_max_abs_diff"] <= 1e-5
        assert r["slice_weights_max_abs_diff"] <= 1e-5
        assert r["ood_score_max_rel_diff"] <= 1e-4
        assert r["gradcam_correlation"] >= 0.9999
        assert r["hirescam_correlation"] >= 0.9999
    assert json.loads(meta["training_summary"]) == checkpoint.training_summary


def test_a_model_without_the_contract_metadata_is_refused(tmp_path) -> None:
    proto = onnx.load(str(BUNDLED_MODEL))
    kept = [p for p in proto.metadata_props if p.key != "preprocessing"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    stripped = tmp_path / "no-preprocessing.onnx"
    onnx.save_model(proto, str(stripped))
    with pytest.raises(ModelContractError, match="preprocessing"):
        Engine(stripped, ["CPUExecutionProvider"])


def test_cuda_is_asked_for_only_where_it_loads(caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-gpu lists CUDA as available on any host; asked for where its libraries are
    missing it writes an error at every start. The engine asks only when the provider library
    loads, and says in one info line why it did not."""
    from service.pipeline.engine import cuda_unloadable_reason

    why = cuda_unloadable_reason()
    with caplog.at_level(logging.INFO, logger="service.pipeline.engine"):
        engine = Engine(BUNDLED_MODEL, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if why is None:  # a GPU host with its libraries: CUDA is asked for and used
        assert engine.requested_providers[0] == "CUDAExecutionProvider"
        return
    assert engine.requested_providers == ("CPUExecutionProvider",)
    assert engine.provider == "CPUExecutionProvider"
    assert [r for r in caplog.records if r.getMessage().startswith("onnxruntime:")] == []
    assert any("CUDA execution provider not used" in r.getMessage() for r in caplog.records)
