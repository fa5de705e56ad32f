"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np

from model_export.metrics import binary_metrics, cam_peak_hits, dilate, roc_auc, summarise


def test_auc_hand_values() -> None:
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert roc_auc([0.9, 0.1], [1, 0]) == 1.0
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))


def test_binary_metrics_balanced_and_chance_adjusted() -> None:
    # MS (class 0) positive: 3 of 4 MS found, 1 of 2 cSVD correctly called cSVD
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.7, 0.3], [0.2, 0.8]])
    labels = [0, 0, 0, 0, 1, 1]
    m = binary_metrics(probs, labels, ("MS", "cSVD"))
    assert m.sensitivity == 0.75 and m.specificity == 0.5
    assert m.balanced_accuracy == 0.625
    assert math.isclose(m.balanced_accuracy_chance_adjusted, 0.25)
    assert m.positive_class == "MS" and m.n == 6


def test_summarise_mean_sd() -> None:
    out = summarise([{"auc": 1.0}, {"auc": 0.8}, {"auc": 0.9}])
    assert math.isclose(out["auc"]["mean"], 0.9) and math.isclose(out["auc"]["sd"], 0.1)


def test_dilate_and_cam_peak_hits() -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    assert dilate(mask, 2).sum() == 13 and dilate(mask, 2)[4, 6] and not dilate(mask, 2)[6, 6]
    cams = np.zeros((3, 9, 9))
    cams[0, 4, 5] = 1.0  # peak next to the lesion: a hit with radius 1
    cams[1, 0, 0] = 1.0  # far away: a miss
    masks = np.stack([mask, mask, np.zeros_like(mask)])  # third slice has no lesion
    assert cam_peak_hits(cams, masks, radius=1) == (1, 2)
