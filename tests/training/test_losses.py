"""Focal loss against a hand computation; the KL prior term."""

from __future__ import annotations

import math

import torch

from model_export.losses import attention_prior_kl, cam_attention_consistency, focal_loss


def test_focal_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    alpha, gamma = 0.25, 2.0
    expected = 0.0
    for (a, b), y in zip(logits.tolist(), labels.tolist(), strict=True):
        p1 = math.exp(b) / (math.exp(a) + math.exp(b))
        pt = p1 if y == 1 else 1 - p1
        at = alpha if y == 1 else 1 - alpha
        expected += -at * (1 - pt) ** gamma * math.log(pt)
    expected /= 3
    assert math.isclose(float(focal_loss(logits, labels, alpha, gamma)), expected, rel_tol=1e-6)


def test_focal_loss_gamma_zero_is_weighted_cross_entropy() -> None:
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isclose(focal_loss(logits, labels, alpha=0.5, gamma=0.0), 0.5 * ce)


def test_focal_loss_down_weights_easy_examples() -> None:
    labels = torch.tensor([0])
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    ratio_focal = focal_loss(easy, labels) / focal_loss(hard, labels)
    ce = torch.nn.functional.cross_entropy
    ratio_ce = ce(easy, labels) / ce(hard, labels)
    assert ratio_focal < ratio_ce / 10


def test_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    prior = torch.softmax(torch.randn(16, generator=torch.Generator().manual_seed(0)), dim=0)
    at_prior = prior.view(1, 1, 4, 4)
    assert abs(float(attention_prior_kl(at_prior, prior.view(4, 4)))) < 1e-6
    uniform = torch.full((1, 1, 4, 4), 1 / 16)
    assert float(attention_prior_kl(uniform, prior.view(4, 4))) > 1e-3


def test_cam_consistency_prefers_a_cam_that_peaks_where_attention_looks() -> None:
    attention = torch.full((1, 2, 4, 4), 0.2 / 15)
    attention[..., 1, 2] = 0.8
    attention = attention / attention.sum((-2, -1), keepdim=True)
    aligned = torch.zeros(1, 2, 4, 4)
    aligned[..., 1, 2] = 5.0
    elsewhere = torch.zeros(1, 2, 4, 4)
    elsewhere[..., 3, 0] = 5.0
    good = cam_attention_consistency(aligned, attention)
    assert good < cam_attention_consistency(elsewhere, attention)
    # Only the CAM's shape counts: scaling it does not change the term.
    assert torch.isclose(cam_attention_consistency(aligned * 40.0, attention), good)


def test_cam_consistency_trains_the_cam_not_the_attention() -> None:
    cam = torch.randn(1, 3, 4, 4, requires_grad=True)
    attention = torch.softmax(torch.randn(1, 3, 16), -1).view(1, 3, 4, 4).requires_grad_(True)
    cam_attention_consistency(cam, attention).backward()
    assert cam.grad is not None and cam.grad.abs().sum() > 0
    assert attention.grad is None
