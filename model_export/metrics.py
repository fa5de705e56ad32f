"""Classification and localisation metrics (numpy only).

The paper reports a chance-adjusted balanced accuracy, (mean recall − 0.5) / 0.5; we report it
under that name next to the plain balanced accuracy, so neither is mistaken for the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class BinaryMetrics:
    n: int
    balanced_accuracy: float
    balanced_accuracy_chance_adjusted: float
    auc: float
    sensitivity: float  # recall of the positive class
    specificity: float  # recall of the negative class
    positive_class: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def roc_auc(scores: npt.ArrayLike, positives: npt.ArrayLike) -> float:
    """Area under the ROC curve as the Mann–Whitney probability (ties count one half)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty_like(s)
    sorted_scores = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(
    probabilities: npt.ArrayLike,
    labels: npt.ArrayLike,
    class_names: tuple[str, ...] | list[str],
    positive: int = 0,
) -> BinaryMetrics:
    """Metrics for class ``positive`` against the other, from (N, 2) probabilities."""
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    predicted = probs.argmax(axis=1)
    is_pos = y == positive
    sensitivity = float((predicted[is_pos] == positive).mean()) if is_pos.any() else float("nan")
    specificity = (
        float((predicted[~is_pos] != positive).mean()) if (~is_pos).any() else float("nan")
    )
    balanced = (sensitivity + specificity) / 2.0
    return BinaryMetrics(
        n=len(y),
        balanced_accuracy=balanced,
        balanced_accuracy_chance_adjusted=(balanced - 0.5) / 0.5,
        auc=roc_auc(probs[:, positive], is_pos),
        sensitivity=sensitivity,
        specificity=specificity,
        positive_class=class_names[positive],
    )


def summarise(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of every numeric metric across folds."""
    keys = [k for k, v in per_fold[0].items() if isinstance(v, float | int)]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([fold[key] for fold in per_fold], dtype=np.float64)
        out[key] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        }
    return out


def dilate(mask: npt.NDArray[np.bool_], radius: int) -> npt.NDArray[np.bool_]:
    """Binary dilation of a 2D mask with a disc of ``radius`` pixels (no scipy needed)."""
    out = mask.copy()
    height, width = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            src = mask[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)]
            out[max(0, dy) : height - max(0, -dy), max(0, dx) : width - max(0, -dx)] |= src
    return out


def cam_peak_hits(
    cam: npt.NDArray[np.floating], lesion_mask: npt.NDArray[np.bool_], radius: int
) -> tuple[int, int]:
    """For every slice (axis 0) with a lesion: does the CAM's peak lie in the lesion mask
    dilated by ``radius`` pixels? ``cam`` and ``lesion_mask`` share the (S, H, W) grid.
    Returns (hits, lesion slices)."""
    hits = slices = 0
    for cam_slice, mask_slice in zip(cam, lesion_mask, strict=True):
        if not mask_slice.any():
            continue
        slices += 1
        if cam_slice.max() <= 0:
            continue  # no evidence on this slice: a miss
        peak = np.unravel_index(int(np.argmax(cam_slice)), cam_slice.shape)
        hits += bool(dilate(mask_slice, radius)[peak])
    return hits, slices
