"""The attention classifier of Comput Biol Med 2024, 108530, in plain PyTorch.

A 2D ResNet runs on every axial slice of a (B, S, 1, H, W) volume. Each slice's last-stage
feature map is pooled by spatial attention (1×1 conv → BN → tanh → 1×1 conv → softmax over
positions); the slice vectors are pooled by gated attention over slices (tanh branch × sigmoid
branch, softmax over slices / T); a linear (or small MLP) head gives the class logits.

Grad-CAM has to be part of the exported ONNX graph, and ``torch.autograd`` inside ``forward``
does not export. :func:`feature_gradient` therefore writes out by hand the backward pass of
everything after the backbone (spatial attention pooling, gated attention, head), in eval mode,
using only ordinary tensor ops; the tests check it against autograd in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; defaults are the paper's (ResNet-34 stage 4, 256 hidden, T = 1)."""

    depth: int = 34
    base_width: int = 64
    output_stage: int = 4
    spatial_attention: bool = True
    instance_attention: bool = True
    attention_hidden: int = 256
    instance_hidden: int = 256
    temperature: float = 1.0
    head_hidden: int = 0  # 0: a linear head, as in the paper; >0: Linear → ReLU → Linear
    num_classes: int = 2
    dropout: float = 0.0
    # Subtracted from the [0, 1] input before the stem: PreprocessingConfig.background, the
    # value air takes, so that air enters the network as 0 and the convolutions' zero padding
    # continues it. (Centring on 0.5 made air −2 against a padding of 0: a frame the features
    # answered to.) Checkpoints of format 1 were trained with 0.5.
    input_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.depth not in _STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(_STAGE_BLOCKS)}, got {self.depth}")
        if not 1 <= self.output_stage <= 4:
            raise ValueError(f"output_stage must be 1..4, got {self.output_stage}")
        if self.base_width < 1 or self.temperature <= 0 or self.num_classes < 2:
            raise ValueError("base_width ≥ 1, temperature > 0 and num_classes ≥ 2 are required")

    @property
    def expansion(self) -> int:
        return 4 if self.depth == 50 else 1

    @property
    def feature_channels(self) -> int:
        return self.base_width * 2 ** (self.output_stage - 1) * self.expansion

    @property
    def feature_stride(self) -> int:
        return 4 * 2 ** (self.output_stage - 1)

    def describe(self) -> str:
        parts = [f"ResNet-{self.depth} w{self.base_width} stage{self.output_stage}"]
        parts.append("spatial-attention" if self.spatial_attention else "spatial-mean")
        parts.append("gated-instance-attention" if self.instance_attention else "slice-mean")
        parts.append(f"mlp{self.head_hidden}" if self.head_hidden else "linear-head")
        return " + ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Backbone: torchvision's ResNet layout (module names match its state dict), one input channel.


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50 up to ``output_stage``; input (N, 1, H, W) in [0, 1]."""

    # A fixed input scale (the spread of ImageNet-normalised input); the offset is the model's
    # ``input_offset`` so that air is 0 where the zero padding starts.
    input_std = 0.25
    # added by add_module in __init__ (layer2.. up to output_stage are looked up by name)
    layer1: nn.Sequential

    def __init__(self, config: ModelConfig):
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck] = (
            Bottleneck if config.depth == 50 else BasicBlock
        )
        width = config.base_width
        self.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        for stage, n_blocks in enumerate(_STAGE_BLOCKS[config.depth][: config.output_stage]):
            stage_width = width * 2**stage
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or in_ch != stage_width * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(in_ch, stage_width * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(stage_width * block.expansion),
                )
            blocks: list[nn.Module] = [block(in_ch, stage_width, stride, downsample)]
            in_ch = stage_width * block.expansion
            blocks += [block(in_ch, stage_width, 1, None) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.n_stages = config.output_stage
        self.input_offset = config.input_offset
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.from_stem(self.stem(x))

    def stem(self, x: Tensor) -> Tensor:
        """Input normalisation, stem and layer 1: the part a fine-tuning run may keep frozen
        (and cache), since it holds generic edge and texture filters."""
        x = (x - self.input_offset) / self.input_std
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.layer1]

    def from_stem(self, x: Tensor) -> Tensor:
        for stage in range(2, self.n_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return x


# --------------------------------------------------------------------------------------------
# Attention pooling and head.


class SpatialAttention(nn.Module):
    """Per-slice attention over feature-map positions: 1×1 conv → BN → tanh → 1×1 conv."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def forward(self, features: Tensor) -> Tensor:
        """(N, C, h, w) → attention logits (N, h*w)."""
        return self.conv2(torch.tanh(self.bn(self.conv1(features)))).flatten(1)


class GatedAttention(nn.Module):
    """Gated attention of Ilse et al. 2018 over slices, no biases, as in the paper's code."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.tanh_branch = nn.Linear(channels, hidden, bias=False)
        self.sigmoid_branch = nn.Linear(channels, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, slice_vectors: Tensor) -> Tensor:
        """(B, S, C) → attention scores (B, S)."""
        gated = torch.tanh(self.tanh_branch(slice_vectors)) * torch.sigmoid(
            self.sigmoid_branch(slice_vectors)
        )
        return self.score(gated).squeeze(-1)


class Head(nn.Module):
    def __init__(self, channels: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(channels, hidden) if hidden else None
        self.out = nn.Linear(hidden or channels, num_classes)

    def forward(self, bag: Tensor) -> Tensor:
        x = self.dropout(bag)
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))
        return self.out(x)


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, K)
    slice_weights: Tensor  # (B, S), sums to one over S
    spatial_attention: Tensor  # (B, S, h, w), sums to one over (h, w)
    features: Tensor  # (B, S, C, h, w): last backbone stage, the Grad-CAM layer
    slice_vectors: Tensor  # (B, S, C)


class AttentionClassifier(nn.Module):
    """Input ``volume`` (B, S, 1, H, W) in [0, 1], slices in canonical inferior→superior order."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        channels = self.config.feature_channels
        self.backbone = ResNetBackbone(self.config)
        self.spatial = (
            SpatialAttention(channels, self.config.attention_hidden)
            if self.config.spatial_attention
            else None
        )
        self.instance = (
            GatedAttention(channels, self.config.instance_hidden)
            if self.config.instance_attention
            else None
        )
        self.head = Head(
            channels, self.config.head_hidden, self.config.num_classes, self.config.dropout
        )

    def forward(self, volume: Tensor) -> ModelOutput:
        batch, slices = volume.shape[0], volume.shape[1]
        feature_maps = self.backbone(volume.flatten(0, 1))  # (B*S, C, h, w)
        return self.pool(feature_maps.unflatten(0, (batch, slices)))

    def pool(self, features: Tensor) -> ModelOutput:
        """Everything after the backbone, from features (B, S, C, h, w)."""
        batch, slices, _channels, height, width = features.shape
        flat = features.flatten(0, 1)  # (B*S, C, h, w)
        positions = flat.flatten(2)  # (B*S, C, h*w)
        if self.spatial is not None:
            alpha = torch.softmax(self.spatial(flat), dim=-1)
        else:
            alpha = torch.ones_like(positions[:, 0]) / positions.shape[-1]
        slice_vectors = torch.einsum("ncp,np->nc", positions, alpha).unflatten(0, (batch, slices))
        if self.instance is not None:
            beta = torch.softmax(self.instance(slice_vectors) / self.config.temperature, dim=1)
        else:
            beta = torch.ones_like(slice_vectors[..., 0]) / slices
        bag = torch.einsum("bsc,bs->bc", slice_vectors, beta)
        return ModelOutput(
            logits=self.head(bag),
            slice_weights=beta,
            spatial_attention=alpha.reshape(batch, slices, height, width),
            features=features,
            slice_vectors=slice_vectors,
        )


# --------------------------------------------------------------------------------------------
# Hand-written backward of the head, for Grad-CAM inside the exported graph.


def resolve_target(logits: Tensor, target_class: Tensor) -> Tensor:
    """``target_class`` (B,) int64; −1 selects the predicted class."""
    predicted = logits.argmax(dim=-1)
    return torch.where(target_class < 0, predicted, target_class)


def feature_gradient(model: AttentionClassifier, out: ModelOutput, target: Tensor) -> Tensor:
    """d logits[b, target[b]] / d features, shape (B, S, C, h, w), for a model in eval mode.

    Derivation, per item (p: position, s: slice, c: channel):
      bag z = Σ_s β_s v_s,   v_s = Σ_p α_sp F_sp,   logit = head(z)
      β = softmax(a / T),    a_s = w·(tanh(V v_s) ⊙ σ(U v_s))
      α_s = softmax(e_s),    e_s = W2 tanh(BN(W1 F_s + b1)) + b2
    """
    features = out.features
    batch, slices, channels, height, width = features.shape
    positions = features.flatten(3)  # (B, S, C, P)
    alpha = out.spatial_attention.flatten(2)  # (B, S, P)
    beta = out.slice_weights  # (B, S)
    v = out.slice_vectors  # (B, S, C)

    # head: d logit / d z
    head = model.head
    w_out = head.out.weight[target]  # (B, K_in)
    if head.hidden is not None:
        bag = torch.einsum("bsc,bs->bc", v, beta)
        pre = head.hidden(bag)
        g_z = ((w_out * (pre > 0).to(w_out.dtype)) @ head.hidden.weight)  # (B, C)
    else:
        g_z = w_out

    # slice pooling: z = Σ β_s v_s
    g_v = beta.unsqueeze(-1) * g_z.unsqueeze(1)  # (B, S, C)
    if model.instance is not None:
        g_beta = torch.einsum("bsc,bc->bs", v, g_z)
        g_a = beta * (g_beta - (beta * g_beta).sum(1, keepdim=True)) / model.config.temperature
        inst = model.instance
        t = torch.tanh(inst.tanh_branch(v))  # (B, S, Hd)
        g = torch.sigmoid(inst.sigmoid_branch(v))
        g_gated = g_a.unsqueeze(-1) * inst.score.weight[0]  # (B, S, Hd)
        g_v = (
            g_v
            + (g_gated * g * (1 - t * t)) @ inst.tanh_branch.weight
            + (g_gated * t * g * (1 - g)) @ inst.sigmoid_branch.weight
        )

    # spatial pooling: v_s = Σ_p α_sp F_sp
    g_features = alpha.unsqueeze(2) * g_v.unsqueeze(-1)  # (B, S, C, P)
    if model.spatial is not None:
        spatial = model.spatial
        g_alpha = torch.einsum("bscp,bsc->bsp", positions, g_v)
        g_e = alpha * (g_alpha - (alpha * g_alpha).sum(-1, keepdim=True))  # (B, S, P)
        bn = spatial.bn
        running_mean, running_var, bias = bn.running_mean, bn.running_var, spatial.conv1.bias
        if running_mean is None or running_var is None or bias is None:  # built with both
            raise ValueError("spatial attention without BN running statistics or conv bias")
        bn_scale = bn.weight / torch.sqrt(running_var + bn.eps)  # eval-mode BN is affine
        w1 = spatial.conv1.weight.flatten(1)  # (Hs, C)
        hidden = torch.einsum("hc,bscp->bshp", w1, positions) + bias[:, None]
        t2 = torch.tanh(
            (hidden - running_mean[:, None]) * bn_scale[:, None] + bn.bias[:, None]
        )
        w2 = spatial.conv2.weight.flatten()  # (Hs,)
        g_hidden = w2[:, None] * g_e.unsqueeze(2) * (1 - t2 * t2) * bn_scale[:, None]
        g_features = g_features + torch.einsum("hc,bshp->bscp", w1, g_hidden)
    return g_features.reshape(batch, slices, channels, height, width)


def grad_cam(features: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM per slice: ReLU(Σ_c mean_p(∂y/∂F_c) · F_c) → (B, S, h, w). Not normalised:
    the slice attention already scales the gradients, so slices stay comparable in a volume.
    Kept to compare with the paper: averaging the gradient over positions cancels the softmax
    attention pooling of this head, so it maps roughly ReLU(w · F) everywhere."""
    return torch.relu(grad_cam_scores(features, gradient))


def grad_cam_scores(features: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM before its ReLU (what training regularises)."""
    weights = gradient.mean(dim=(-2, -1), keepdim=True)
    return (weights * features).sum(dim=2)


def hires_cam(features: Tensor, gradient: Tensor) -> Tensor:
    """HiResCAM per slice: ReLU(Σ_c ∂y/∂F_c ⊙ F_c) → (B, S, h, w) (Draelos & Carin 2020).
    Element-wise, so each position keeps its own gradient, attention weight included: for a
    head that is linear in attention-pooled features it is exactly each position's share of
    the class score (before the ReLU), which makes it faithful where Grad-CAM is not."""
    return torch.relu((gradient * features).sum(dim=2))


def volume_embedding(out: ModelOutput) -> Tensor:
    """(B, 2C): each channel's mean over slices and positions and its spatial spread (standard
    deviation over positions, averaged over slices): feature statistics of the whole image
    (contrast, texture, anatomy). Measured on the demo model (fit 120 phantoms, threshold at
    the validation 99th percentile): T1-weighted phantoms and real non-FLAIR series are
    flagged 97–100 %, a large mass ~50 %, fresh in-distribution phantoms 7 %. The
    attention-pooled bag vector, which the head classifies, was dropped from it: beside these
    statistics it took every must-flag rate to 0–60 % (it varies most within the training data
    itself)."""
    features = out.features  # (B, S, C, h, w)
    mean_ps = features.mean(dim=(3, 4))  # (B, S, C)
    # population variance over positions, written out so one-slice inputs stay finite
    variance = (features * features).mean(dim=(3, 4)) - mean_ps * mean_ps
    spread = torch.sqrt(torch.clamp(variance, min=0.0)).mean(dim=1)
    return torch.cat([mean_ps.mean(dim=1), spread], dim=1)


def embedding_dim(config: ModelConfig) -> int:
    """Length of :func:`volume_embedding` for a model of ``config``."""
    return 2 * config.feature_channels


class EmbeddingDistance(nn.Module):
    """Mahalanobis distance of a volume's embedding to the nearest class mean, with one shared
    covariance fitted on the training split (Lee et al. 2018): large means "unlike anything
    trained on". Its correlation matrix is shrunk towards the identity, so the shrinkage does not
    depend on the scale of each value (channel means and spreads differ by orders of
    magnitude). Buffers, so the fit travels in the checkpoint and the ONNX graph."""

    # registered buffers (nn.Module's attribute lookup is typed as Tensor | Module)
    means: Tensor
    whitening: Tensor

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, dim))
        self.register_buffer("whitening", torch.eye(dim))  # L⁻ᵀ for Σ = L Lᵀ

    @torch.no_grad()
    def fit(self, embeddings: Tensor, labels: Tensor, shrinkage: float = 0.1) -> None:
        x = embeddings.double()
        means = torch.stack([x[labels == k].mean(0) for k in range(self.means.shape[0])])
        centred = x - means[labels]
        cov = centred.T @ centred / max(len(x) - 1, 1)
        scale = torch.sqrt(cov.diagonal()).clamp_min(1e-6)
        correlation = cov / torch.outer(scale, scale)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        cov = torch.outer(scale, scale) * ((1 - shrinkage) * correlation + shrinkage * eye)
        chol = torch.linalg.cholesky(cov)
        self.means.copy_(means.float())
        self.whitening.copy_(torch.linalg.solve_triangular(chol, eye, upper=False).T.float())

    def forward(self, embedding: Tensor) -> Tensor:
        diff = embedding[:, None, :] - self.means[None]  # (B, K, D)
        squared = (diff @ self.whitening).pow(2).sum(-1)  # (B, K)
        return torch.sqrt(squared.min(dim=1).values)


class ExplainedOutput(NamedTuple):
    probabilities: Tensor  # calibrated
    logits: Tensor  # calibrated: the network's logits / temperature
    slice_weights: Tensor
    spatial_attention: Tensor
    gradcam: Tensor
    hirescam: Tensor
    ood_score: Tensor


class ExplainedClassifier(nn.Module):
    """The exported graph: calibrated classification, its explanation maps for
    ``target_class`` and the distance from the training data, in one pass. Output order is
    ``service.core.contract.OUTPUT_NAMES``."""

    temperature: Tensor  # a registered buffer

    def __init__(self, model: AttentionClassifier, temperature: float = 1.0,
                 distance: EmbeddingDistance | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.distance = distance or EmbeddingDistance(embedding_dim(model.config),
                                                      model.config.num_classes)

    def forward(self, volume: Tensor, target_class: Tensor) -> ExplainedOutput:
        out = self.model(volume)
        target = resolve_target(out.logits, target_class)
        gradient = feature_gradient(self.model, out, target)
        logits = out.logits / self.temperature
        return ExplainedOutput(
            probabilities=torch.softmax(logits, dim=-1),
            logits=logits,
            slice_weights=out.slice_weights,
            spatial_attention=out.spatial_attention,
            gradcam=grad_cam(out.features, gradient),
            hirescam=hires_cam(out.features, gradient),
            ood_score=self.distance(volume_embedding(out)),
        )


class AutogradMaps(NamedTuple):
    out: ModelOutput
    gradcam: Tensor
    hirescam: Tensor


def autograd_maps(
    model: AttentionClassifier, volume: Tensor, target_class: Tensor
) -> AutogradMaps:
    """Reference Grad-CAM and HiResCAM from autograd (eval mode), for verification only."""
    features = model.backbone(volume.flatten(0, 1)).unflatten(0, volume.shape[:2]).detach()
    features.requires_grad_(True)
    out = model.pool(features)
    target = resolve_target(out.logits, target_class)
    selected = out.logits.gather(1, target[:, None]).sum()
    (gradient,) = torch.autograd.grad(selected, features)
    detached = features.detach()
    return AutogradMaps(out, grad_cam(detached, gradient), hires_cam(detached, gradient))


def autograd_grad_cam(
    model: AttentionClassifier, volume: Tensor, target_class: Tensor
) -> tuple[ModelOutput, Tensor]:
    """Reference Grad-CAM from autograd (eval mode), for verification only."""
    maps = autograd_maps(model, volume, target_class)
    return maps.out, maps.gradcam


# --------------------------------------------------------------------------------------------
# Transfer learning from local torchvision/timm ResNet weights.


class PretrainedReport(NamedTuple):
    loaded: list[str]
    missing: list[str]  # backbone parameters the file did not provide
    unexpected: list[str]  # file entries that are not backbone parameters (e.g. fc.*)
    mismatched: list[str]  # present in both, but with another shape


_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def load_pretrained_backbone(
    model: AttentionClassifier, source: Path | str | Mapping[str, Tensor]
) -> PretrainedReport:
    """Load a torchvision- or timm-format ResNet state dict (a local file, never a download).

    The RGB stem is summed over its input channels into our one-channel stem. Classifier and
    other non-backbone entries are reported as unexpected; shape mismatches are reported and
    skipped rather than half-loaded. A file from ``model_export.pretrain`` also carries the
    spatial-attention weights (key ``spatial_attention``), loaded when the model has one.
    """
    attention_state: dict[str, Tensor] | None = None
    state: dict[str, Any]  # torch.load's: checked below, entry by entry
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = torch.load(Path(source), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("spatial_attention"), dict):
            attention_state = state["spatial_attention"]  # written by model_export.pretrain
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    if "conv1.weight" in cleaned and cleaned["conv1.weight"].shape[1] == 3:
        cleaned["conv1.weight"] = cleaned["conv1.weight"].sum(dim=1, keepdim=True)

    own = model.backbone.state_dict()
    loadable, mismatched = {}, []
    for key, value in cleaned.items():
        if key in own:
            if own[key].shape == value.shape:
                loadable[key] = value
            else:
                mismatched.append(key)
    model.backbone.load_state_dict(loadable, strict=False)
    loaded = sorted(loadable)
    if attention_state is not None and model.spatial is not None:
        model.spatial.load_state_dict(attention_state)
        loaded += sorted(f"spatial.{key}" for key in attention_state)
    return PretrainedReport(
        loaded=loaded,
        missing=sorted(set(own) - set(loadable) - set(mismatched)),
        unexpected=sorted(set(cleaned) - set(own)),
        mismatched=sorted(mismatched),
    )


def centre_ring_prior(height: int, width: int, radius: float = 0.35, sigma: float = 0.15) -> Tensor:
    """A ring around the image centre (radius as a fraction of the half-size), where
    periventricular and deep white matter lie; a floor keeps every position possible."""
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 - 1
    r = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    ring = torch.exp(-((r - radius) ** 2) / (2 * sigma**2)) + 1e-3
    return (ring / ring.sum()).to(torch.float32)

