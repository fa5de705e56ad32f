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


def cam_attention_consistency(
    cam: Tensor, spatial_attention: Tensor, sharpness: float = 3.0, eps: float = 1e-6
) -> Tensor:
    """Cross-entropy from the spatial attention (held fixed) to the Grad-CAM's position
    distribution, averaged over slices.

    Grad-CAM averages the gradient over positions, so with attention pooling it lights up
    wherever features resemble the class direction, not where the model looked. This term
    (an explanation-consistency regulariser) pulls the CAM's peak towards the positions the
    model's own attention pools. ``cam`` is the pre-ReLU Grad-CAM (…, h, w), standardised per
    slice so that only its shape matters, not its scale.
    """
    scores = cam.flatten(-2)
    scores = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + eps)
    log_q = torch.log_softmax(sharpness * scores, dim=-1)
    target = spatial_attention.flatten(-2).detach()
    return -(target * log_q).sum(-1).mean()
