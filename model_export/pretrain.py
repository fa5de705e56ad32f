"""Backbone pretraining on a synthetic lesion-segmentation proxy task, for transfer learning.

The paper starts from ImageNet weights; none can be downloaded here, and a from-scratch ResNet
does not learn the MS/cSVD task from a few hundred image-level labels on two CPU cores (we
tried: validation AUC stayed near 0.5 after 30 epochs). Instead the backbone first learns, slice
by slice, to segment lesions *by radiological descriptor* (periventricular band/cap, ovoid
periventricular, juxtacortical, infratentorial, callosal, deep, pontine, lacune; see
``phantoms.LESION_SITES``), on phantoms whose seeds no classifier cohort uses. This is the kind
of annotation a reader gives lesion by lesion; it is not the diagnosis, but by construction of
the phantoms the descriptors are strongly tied to the class, which the model card states. The
result is a plain ResNet state dict in torchvision's key layout, loaded through the same
``--pretrained`` path as any torchvision/timm file.

    python -m model_export.pretrain --phantoms 96 --config demo --out runs/demo/backbone.pth
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model_export import seeds
from model_export.metrics import roc_auc
from model_export.model import ModelConfig, ResNetBackbone, SpatialAttention
from model_export.train import PRESETS, augment, seed_everything
from service.core.preprocess import (
    PreprocessingConfig,
    preprocess,
    reorient_to_canonical,
    resize_area,
)
from service.phantoms import CLASS_NAMES, LESION_SITES, generate_phantom

# Phantom seeds for pretraining: (PRETRAIN_SEED_BASE + run seed) * 100_000 + i, inside
# seeds.PRETRAIN, which no classifier, evaluation or test cohort shares.
PRETRAIN_SEED_BASE = seeds.PRETRAIN_BLOCK
PRESENCE = 0.01  # share of a feature cell a site must cover to count as present there
POS_WEIGHT = 5.0


class LesionSiteSegmenter(nn.Module):
    """Backbone + a 1×1 conv giving per-cell lesion-site logits on the feature grid, and the
    classifier's spatial-attention module trained as a per-cell lesion detector, so that
    attention starts out looking at lesions rather than at the whole slice."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backbone = ResNetBackbone(config)
        self.head = nn.Conv2d(config.feature_channels, len(LESION_SITES), 1)
        self.attention = SpatialAttention(config.feature_channels, config.attention_hidden)

    def forward(self, slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) → site logits (N, K, h, w), lesion logits (N, h*w)."""
        features = self.backbone(slices)
        return self.head(features), self.attention(features)


def _site_example(args: tuple[int, str, int, PreprocessingConfig, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One phantom → (model input (S, H, W), site fractions (S, K, h, w) on the feature grid)."""
    seed, label, slices, config, stride = args
    phantom = generate_phantom(label, seed, slices=slices)
    prepared = preprocess(phantom.volume, phantom.affine, config)
    if phantom.lesion_sites is None:  # generate_phantom draws them for every class
        raise ValueError(f"phantom {seed} ({label}) has no lesion sites")
    sites = reorient_to_canonical(phantom.lesion_sites, phantom.affine).array
    n_slices, height, width = config.model_grid
    grid = (n_slices, height // stride, width // stride)
    fractions = np.stack([resize_area((sites == k).astype(np.float32), grid)
                          for k in range(len(LESION_SITES))], axis=1)
    return prepared.model_input, fractions


def site_cohort(n: int, config: PreprocessingConfig, stride: int, seed: int,
                workers: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(PRETRAIN_SEED_BASE + seed)
    jobs = [((PRETRAIN_SEED_BASE + seed) * 100_000 + i, CLASS_NAMES[i % 2],
             int(rng.integers(20, 31)), config, stride) for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        pairs = list(pool.map(_site_example, jobs, chunksize=4))
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def pretrain(config: ModelConfig, preprocessing: PreprocessingConfig, n_phantoms: int,
             epochs: int, seed: int, lr: float = 1e-3, batch_slices: int = 24,
             workers: int = 2) -> tuple[LesionSiteSegmenter, list[dict[str, Any]]]:
    seed_everything(seed)
    volumes, targets = site_cohort(n_phantoms, preprocessing, config.feature_stride, seed,
                                   workers)  # (N*S, H, W), (N*S, K, h, w)
    model = LesionSiteSegmenter(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(volumes))
        total = 0.0
        steps = range(0, len(order), batch_slices)
        for start in tqdm(steps, desc=f"pretrain epoch {epoch}", leave=False, disable=None):
            chunk = np.sort(order[start : start + batch_slices])
            x = torch.from_numpy(volumes[chunk])[:, None, None]  # (N, 1, 1, H, W)
            x = augment(x, generator, flips=False)[:, 0]
            # which sites a cell holds any of: lesions are small against a 16-pixel cell, so
            # presence, not the covered fraction, is the sharp signal
            present = (torch.from_numpy(targets[chunk][:, 1:]) > PRESENCE).float()
            any_lesion = (torch.from_numpy(1.0 - targets[chunk][:, 0]) > PRESENCE).float()
            site_logits, lesion_logits = model(x)
            pos_weight = torch.tensor(POS_WEIGHT)
            loss = F.binary_cross_entropy_with_logits(
                site_logits[:, 1:], present, pos_weight=pos_weight
            ) + F.binary_cross_entropy_with_logits(
                lesion_logits, any_lesion.flatten(1), pos_weight=pos_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(chunk)
        history.append({"epoch": epoch, "loss": total / len(volumes)})
        print(f"[pretrain] epoch {epoch}: loss {total / len(volumes):.4f}", file=sys.stderr)
    held_out = evaluate(model, *site_cohort(8, preprocessing, config.feature_stride,
                                             seed + 1, workers))
    print(f"[pretrain] held-out: {json.dumps(held_out)}", file=sys.stderr)
    history.append({"held_out": held_out})
    return model, history


@torch.no_grad()
def evaluate(model: LesionSiteSegmenter, volumes: np.ndarray, targets: np.ndarray
             ) -> dict[str, float]:
    """Cell-level AUC of each site's presence on held-out phantoms (sites present there)."""
    model.eval()
    probs = np.concatenate([
        torch.sigmoid(model(torch.from_numpy(volumes[i : i + 24])[:, None])[0][:, 1:]).numpy()
        for i in range(0, len(volumes), 24)])
    present = targets[:, 1:] > PRESENCE
    return {LESION_SITES[k + 1]: roc_auc(probs[:, k].ravel(), present[:, k].ravel())
            for k in range(present.shape[1]) if present[:, k].any()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_export.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phantoms", type=int, default=96)
    p.add_argument("--config", choices=sorted(PRESETS), default="demo")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = PRESETS[args.config][0]
    model, history = pretrain(config, PreprocessingConfig(), args.phantoms, args.epochs,
                                 args.seed, workers=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # "state_dict" is a plain ResNet in torchvision's layout; the attention travels beside it
    torch.save({"state_dict": model.backbone.state_dict(),
                "spatial_attention": model.attention.state_dict(),
                "site_head": model.head.state_dict()}, args.out)
    print(json.dumps({"out": str(args.out), "history": history}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
