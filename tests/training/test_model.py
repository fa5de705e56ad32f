"""The attention classifier: shapes, ablations, hand-written head backward vs autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_export.model import (
    AttentionClassifier,
    EmbeddingDistance,
    ExplainedClassifier,
    ModelConfig,
    autograd_grad_cam,
    autograd_maps,
    centre_ring_prior,
    feature_gradient,
    load_pretrained_backbone,
    resolve_target,
)
from service.core.preprocess import PreprocessingConfig

CONFIGS = [
    ModelConfig(depth=18, base_width=8),
    ModelConfig(depth=34, base_width=4, output_stage=3, head_hidden=16, temperature=0.7),
    ModelConfig(depth=50, base_width=4, spatial_attention=False),
    ModelConfig(depth=18, base_width=8, instance_attention=False),
    ModelConfig(depth=18, base_width=8, spatial_attention=False, instance_attention=False),
]


def randomise_batch_norm(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so the BN step of the backward is really exercised."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_hand_written_backward_matches_autograd_float64(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = AttentionClassifier(config).double()
    randomise_batch_norm(model)
    model.eval()
    volume = torch.rand(3, 5, 1, 64, 64, dtype=torch.float64)
    target_class = torch.tensor([-1, 0, 1])

    features = model.backbone(volume.flatten(0, 1)).unflatten(0, (3, 5)).detach()
    features.requires_grad_(True)
    out = model.pool(features)
    target = resolve_target(out.logits, target_class)
    (reference,) = torch.autograd.grad(out.logits.gather(1, target[:, None]).sum(), features)

    with torch.no_grad():
        mine = feature_gradient(model, model.pool(features.detach()), target)
    assert reference.abs().max() > 0
    torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-14)


def test_explained_classifier_equals_autograd_grad_cam() -> None:
    torch.manual_seed(0)
    model = AttentionClassifier(ModelConfig(depth=18, base_width=8)).double().eval()
    volume = torch.rand(2, 4, 1, 64, 64, dtype=torch.float64)
    target_class = torch.tensor([1, -1])
    with torch.no_grad():
        explained = ExplainedClassifier(model).double()(volume, target_class)
    _, reference = autograd_grad_cam(model, volume, target_class)
    torch.testing.assert_close(explained.gradcam, reference, rtol=1e-9, atol=1e-12)


def test_explained_classifier_equals_autograd_hirescam_and_applies_temperature() -> None:
    torch.manual_seed(1)
    model = AttentionClassifier(ModelConfig(depth=18, base_width=8)).double().eval()
    volume = torch.rand(2, 5, 1, 64, 64, dtype=torch.float64)
    target_class = torch.tensor([0, -1])
    explained = ExplainedClassifier(model, temperature=0.5).double().eval()
    with torch.no_grad():
        out = explained(volume, target_class)
        raw = model(volume).logits
    maps = autograd_maps(model, volume, target_class)
    assert maps.hirescam.abs().max() > 0
    torch.testing.assert_close(out.hirescam, maps.hirescam, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.gradcam, maps.gradcam, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.logits, raw / 0.5)
    torch.testing.assert_close(out.probabilities, torch.softmax(raw / 0.5, -1))
    # HiResCAM keeps each position's own gradient: it is not Grad-CAM
    assert not torch.allclose(out.hirescam, out.gradcam)


def test_embedding_distance_is_mahalanobis_to_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (60, 4)), rng.normal(3, 2, (60, 4))])
    labels = np.repeat([0, 1], 60)
    distance = EmbeddingDistance(4, 2)
    distance.fit(torch.from_numpy(x), torch.from_numpy(labels), shrinkage=0.0)
    means = np.stack([x[labels == k].mean(0) for k in (0, 1)])
    cov = np.cov((x - means[labels]).T)
    probe = rng.normal(1, 3, (5, 4))
    expected = np.sqrt(np.min([np.einsum("nd,de,ne->n", probe - m, np.linalg.inv(cov), probe - m)
                               for m in means], axis=0))
    got = distance(torch.from_numpy(probe).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_air_enters_the_network_as_zero() -> None:
    """The zero padding of the first convolution must continue the air, not draw a frame:
    the network subtracts the preprocessing's background value before its stem."""
    preprocessing = PreprocessingConfig()
    assert preprocessing.background == 0.0
    assert PreprocessingConfig.from_json(preprocessing.to_json()) == preprocessing
    model = AttentionClassifier(ModelConfig(depth=18, base_width=4, output_stage=2,
                                            attention_hidden=8, instance_hidden=8,
                                            input_offset=preprocessing.background)).eval()
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_module: object, inputs: tuple[torch.Tensor, ...], _output: object) -> None:
        captured["x"] = inputs[0]

    model.backbone.conv1.register_forward_hook(keep_input)
    with torch.no_grad():
        model(torch.full((1, 2, 1, 64, 64), preprocessing.background))
    assert torch.count_nonzero(captured["x"]) == 0


def test_output_shapes_and_normalisation() -> None:
    config = ModelConfig(depth=18, base_width=8, output_stage=3)
    model = AttentionClassifier(config).eval()
    with torch.no_grad():
        out = ExplainedClassifier(model)(torch.rand(2, 6, 1, 128, 96), torch.tensor([-1, -1]))
    h, w = 128 // config.feature_stride, 96 // config.feature_stride
    assert out.probabilities.shape == (2, 2)
    assert out.slice_weights.shape == (2, 6)
    assert out.spatial_attention.shape == out.gradcam.shape == (2, 6, h, w)
    torch.testing.assert_close(out.probabilities.sum(-1), torch.ones(2))
    torch.testing.assert_close(out.slice_weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(out.spatial_attention.sum((-2, -1)), torch.ones(2, 6))
    assert (out.gradcam >= 0).all()


def test_ablations_pool_uniformly() -> None:
    model = AttentionClassifier(
        ModelConfig(depth=18, base_width=4, spatial_attention=False, instance_attention=False)
    ).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 4, 1, 64, 64))
    torch.testing.assert_close(out.slice_weights, torch.full((1, 4), 0.25))
    torch.testing.assert_close(out.spatial_attention, torch.full((1, 4, 2, 2), 0.25))
    assert model.spatial is None and model.instance is None


def test_paper_defaults() -> None:
    config = ModelConfig()
    model = AttentionClassifier(config)
    assert (config.depth, config.output_stage, config.feature_channels) == (34, 4, 512)
    assert model.spatial is not None and model.spatial.conv1.out_channels == 256
    assert model.instance is not None and model.instance.tanh_branch.bias is None
    assert model.head.hidden is None  # linear head


def torchvision_layout_state_dict(depth: int, width: int) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet key layout and an RGB stem + fc, as the file from
    `torchvision.models.resnet18().state_dict()` has (written here, nothing downloaded)."""
    reference = AttentionClassifier(ModelConfig(depth=depth, base_width=width)).backbone
    generator = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in reference.state_dict().items()}
    state["conv1.weight"] = torch.randn((width, 3, 7, 7), generator=generator)
    state["fc.weight"] = torch.randn((1000, 8 * width), generator=generator)
    state["fc.bias"] = torch.randn(1000, generator=generator)
    return state


@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_pretrained_torchvision_layout_loads(tmp_path, prefix: str) -> None:
    state = torchvision_layout_state_dict(18, 8)
    path = tmp_path / "resnet18.pth"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    model = AttentionClassifier(ModelConfig(depth=18, base_width=8))
    report = load_pretrained_backbone(model, path)

    assert report.missing == [] and report.mismatched == []
    assert report.unexpected == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.backbone.conv1.weight,
                               state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight,
                               state["layer4.1.conv2.weight"])


def test_pretrained_reports_missing_and_mismatched() -> None:
    state = torchvision_layout_state_dict(18, 8)  # a wider file than the model
    del state["layer1.0.bn1.running_mean"]
    model = AttentionClassifier(ModelConfig(depth=18, base_width=8, output_stage=2))
    before = model.backbone.layer1[0].bn1.running_mean.clone()
    report = load_pretrained_backbone(model, {"state_dict": state}["state_dict"])
    assert "layer1.0.bn1.running_mean" in report.missing
    assert "layer3.0.conv1.weight" in report.unexpected  # stages beyond output_stage
    torch.testing.assert_close(model.backbone.layer1[0].bn1.running_mean, before)

    narrow = AttentionClassifier(ModelConfig(depth=18, base_width=4))
    report = load_pretrained_backbone(narrow, state)
    assert "conv1.weight" in report.mismatched and "conv1.weight" not in report.loaded


def test_centre_ring_prior() -> None:
    prior = centre_ring_prior(16, 16)
    assert torch.isclose(prior.sum(), torch.tensor(1.0))
    centre, corner = prior[8, 8], prior[0, 0]
    ring = prior[8, 8 + int(0.35 * 8)]
    assert ring > centre and ring > corner
