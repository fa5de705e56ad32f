"""Focal loss and the spatial-attention prior term of the paper."""

from __future__ import annotations

import torch
from torch import Tensor


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.5, gamma: float = 2.0) -> Tensor:
    """Mean of −α_t (1 − p_t)^γ log p_t over the batch (Lin et al. 2017).

    α weighs class 1 and 1 − α class 0 (α = 0.5, the paper's value, weighs both alike); for more
    than two classes every class gets α.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    log_pt = log_probs.gather(1, labels[:, None]).squeeze(1)
    pt = log_pt.exp()
    if logits.shape[-1] == 2:
        alpha_t = torch.where(labels == 1, alpha, 1.0 - alpha)
    else:
        alpha_t = torch.full_like(pt, alpha)
    return (-alpha_t * (1.0 - pt) ** gamma * log_pt).mean()


def attention_prior_kl(spatial_attention: Tensor, prior: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(attention ‖ prior), averaged over slices: pulls each slice's spatial attention
    (…, h, w), summing to one, towards the prior (h, w)."""
    attention = spatial_attention.flatten(-2)
    reference = prior.flatten().to(attention.dtype)
    kl = (attention * (torch.log(attention + eps) - torch.log(reference + eps))).sum(-1)
    return kl.mean()
