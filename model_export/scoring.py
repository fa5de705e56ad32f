"""The evaluation's figures of merit (numpy only): calibration, intervals, and where maps point.

Definitions, stated once so the JSON and the card can say which one they report:

* **ECE**: 10 equal-width bins over [0, 1] on the *confidence of the predicted class* (top-label
  ECE, Guo et al. 2017); Σ_b (n_b / N) · |accuracy_b − confidence_b|. For two classes the
  confidence lies in [0.5, 1], so the lower five bins stay empty.
* **Brier score**: mean (P(MS) − [label is MS])² — the binary form (half the two-class sum).
* **AUC interval**: percentile bootstrap, resampling MS and cSVD series separately with
  replacement (stratified), from a fixed seed.
* **Pointing**: a source slice with lesion is a hit when the map's peak lies inside the lesion
  mask dilated by a disc of ``radius_mm`` (an ellipse in pixels when the pixels are not square);
  a slice whose map is all zero is a miss, and so is one where the map is *invisible*: its peak
  below 1/255 of the volume's peak, the least the service's overlay (normalised per volume,
  8-bit colour) can show.
* **Edge peaks**: over the source slices that contain brain and show the map (visible, as
  above), the share whose peak lies within ``edge_px`` of the image border. The argmax of an
  invisible slice is noise; it is counted separately (``edge_peaks_any``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

ECE_DEFINITION = "10 equal-width bins on the confidence of the predicted class (top-label ECE)"
BRIER_DEFINITION = "mean squared error of P(MS) against the MS indicator (binary Brier score)"


def softmax(logits: npt.ArrayLike) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def uncalibrated_probabilities(calibrated_logits: npt.ArrayLike, temperature: float) -> FloatArray:
    """The network's own probabilities: the graph's logits are divided by T, so undo that."""
    return softmax(np.asarray(calibrated_logits, dtype=np.float64) * temperature)


def brier(p_positive: npt.ArrayLike, positives: npt.ArrayLike) -> float:
    p = np.asarray(p_positive, dtype=np.float64)
    y = np.asarray(positives, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else math.nan


@dataclass(frozen=True)
class Reliability:
    """Per bin (``[edges[b], edges[b+1])``, the last one closed): series count, mean
    confidence and accuracy (None if empty); ``ece`` over all of them."""

    edges: list[float]
    counts: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]
    ece: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reliability(probabilities: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10) -> Reliability:
    """Top-label reliability table and ECE of (N, K) probabilities against integer labels."""
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds [edges[b], edges[b+1]); a confidence of exactly 1 goes to the last bin
    index = np.clip(np.floor(confidence * bins).astype(np.int64), 0, bins - 1)
    counts: list[int] = []
    conf: list[float | None] = []
    acc: list[float | None] = []
    gap = 0.0
    for b in range(bins):
        member = index == b
        n = int(member.sum())
        counts.append(n)
        if n == 0:
            conf.append(None)
            acc.append(None)
            continue
        c, a = float(confidence[member].mean()), float(correct[member].mean())
        conf.append(c)
        acc.append(a)
        gap += n * abs(a - c)
    ece = gap / len(y) if len(y) else math.nan
    return Reliability([float(e) for e in edges], counts, conf, acc, ece)


def _pair_matrix(scores_pos: FloatArray, scores_neg: FloatArray) -> FloatArray:
    """1 where a positive outranks a negative, ½ on ties: the Mann–Whitney kernel."""
    diff = scores_pos[:, None] - scores_neg[None, :]
    return np.asarray((diff > 0).astype(np.float64) + 0.5 * (diff == 0))


def bootstrap_auc(scores: npt.ArrayLike, positives: npt.ArrayLike, *, resamples: int = 2000,
                  seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, lower, upper): the point estimate and a stratified percentile interval."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    sp, sn = s[pos], s[~pos]
    if sp.size == 0 or sn.size == 0:
        return math.nan, math.nan, math.nan
    kernel = _pair_matrix(sp, sn)
    auc = float(kernel.mean())
    rng = np.random.default_rng(seed)
    draws: list[float] = []
    for start in range(0, resamples, 256):  # chunks bound the (R, n) count matrices
        r = min(256, resamples - start)
        cp = _counts(rng.integers(0, sp.size, size=(r, sp.size)), sp.size)
        cn = _counts(rng.integers(0, sn.size, size=(r, sn.size)), sn.size)
        draws.extend(np.einsum("ri,ij,rj->r", cp, kernel, cn) / (sp.size * sn.size))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(draws), [tail, 1.0 - tail])
    return auc, float(low), float(high)


def _counts(indices: npt.NDArray[np.int64], size: int) -> FloatArray:
    """How often each of ``size`` items was drawn, per row of ``indices``."""
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    out = np.zeros((indices.shape[0], size), dtype=np.float64)
    np.add.at(out, (rows, indices.ravel()), 1.0)
    return out


def dilate_ellipse(mask: BoolArray, radius_rows: float, radius_cols: float) -> BoolArray:
    """Binary dilation of a 2D mask by the ellipse dy²/r_r² + dx²/r_c² ≤ 1 (radii in pixels,
    not necessarily integers); a disc when both radii are equal."""
    out = mask.copy()
    height, width = mask.shape
    ry, rx = math.floor(radius_rows), math.floor(radius_cols)
    for dy in range(-ry, ry + 1):
        for dx in range(-rx, rx + 1):
            if (dy / max(radius_rows, 1e-9)) ** 2 + (dx / max(radius_cols, 1e-9)) ** 2 > 1.0:
                continue
            src = mask[max(0, -dy): height - max(0, dy), max(0, -dx): width - max(0, dx)]
            out[max(0, dy): height - max(0, -dy), max(0, dx): width - max(0, -dx)] |= src
    return out


@dataclass(frozen=True)
class MapStats:
    """One map of one series on the source grid."""

    hits: int  # lesion slices whose (visible) peak lies in the dilated lesion
    lesion_slices: int
    mass_in_brain: float | None  # share of the map's sum inside the brain; None if all zero
    edge_peaks: int  # visible brain slices whose peak lies within ``edge_px`` of the border
    peak_slices: int  # visible brain slices (the denominator of edge_peaks)
    edge_peaks_any: int  # the same over every brain slice with a non-zero map
    peak_slices_any: int
    # lesion slices where the map shows nothing (all zero, or under the visible floor): misses
    # because the model put no visible evidence there, not because its peak lay elsewhere
    lesion_slices_not_shown: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VISIBLE_FRACTION = 1.0 / 255.0


def map_stats(cam: npt.NDArray[np.floating], lesion: BoolArray, brain: BoolArray, *,
              pixel_mm: tuple[float, float], radius_mm: float = 7.5, edge_px: int = 4,
              dilated: list[BoolArray | None] | None = None,
              visible_fraction: float = VISIBLE_FRACTION) -> MapStats:
    """Pointing, mass in brain and edge peaks of ``cam`` (S, H, W) against the masks of the
    same grid. ``pixel_mm`` = (row spacing, column spacing); ``dilated`` may carry the lesion
    slices' dilated masks (index-aligned, None elsewhere) to share them between maps."""
    if not cam.shape == lesion.shape == brain.shape:
        raise ValueError(f"shapes differ: map {cam.shape}, lesion {lesion.shape}, "
                         f"brain {brain.shape}")
    dilated = dilated if dilated is not None else dilate_lesions(lesion, pixel_mm, radius_mm)
    values = np.asarray(cam, dtype=np.float64)
    height, width = values.shape[1:]
    floor = visible_fraction * float(values.max(initial=0.0))
    hits = lesion_slices = edge = peaks = edge_any = peaks_any = not_shown = 0
    for k in range(values.shape[0]):
        plane = values[k]
        top = float(plane.max())
        visible = top > 0 and top >= floor
        peak = np.unravel_index(int(np.argmax(plane)), plane.shape)
        grown = dilated[k]
        if grown is not None:
            lesion_slices += 1
            hits += bool(visible and grown[peak])
            not_shown += not visible
        if brain[k].any() and top > 0:
            r, c = int(peak[0]), int(peak[1])
            near = min(r, c, height - 1 - r, width - 1 - c) < edge_px
            peaks_any += 1
            edge_any += near
            peaks += visible
            edge += near and visible
    total = float(values.sum())
    mass = float(values[brain].sum()) / total if total > 0 else None
    return MapStats(hits, lesion_slices, mass, edge, peaks, edge_any, peaks_any, not_shown)


def dilate_lesions(lesion: BoolArray, pixel_mm: tuple[float, float],
                   radius_mm: float = 7.5) -> list[BoolArray | None]:
    """Per slice, the lesion mask dilated by ``radius_mm`` (None on slices without lesion)."""
    ry, rx = radius_mm / pixel_mm[0], radius_mm / pixel_mm[1]
    return [dilate_ellipse(plane, ry, rx) if plane.any() else None for plane in lesion]


def rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def distribution(values: npt.ArrayLike) -> dict[str, float | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"median": None, "p5": None, "p95": None}
    p5, median, p95 = np.quantile(v, [0.05, 0.5, 0.95])
    return {"median": float(median), "p5": float(p5), "p95": float(p95)}


@dataclass(frozen=True)
class Target:
    """A goal a figure is held to; ``missed_by`` is how far short it fell (0 when met)."""

    name: str
    cohort: str
    value: float | None
    goal: float
    at_least: bool  # True: value ≥ goal is met; False: value ≤ goal (or < goal, see strict)
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        met: bool | None
        # a figure equal to its goal up to float rounding meets it (0.93 as (0.94 + 0.92) / 2)
        value = None if self.value is None else round(self.value, 12)
        if value is None or not math.isfinite(value):
            met, missed = None, None
        elif self.at_least:
            met = value > self.goal if self.strict else value >= self.goal
            missed = 0.0 if met else self.goal - value
        else:
            met = value < self.goal if self.strict else value <= self.goal
            missed = 0.0 if met else value - self.goal
        op = (">" if self.strict else "≥") if self.at_least else ("<" if self.strict else "≤")
        return {"name": self.name, "cohort": self.cohort, "value": self.value,
                "goal": self.goal, "op": op, "met": met, "missed_by": missed}
