"""The evaluation (model_export.evaluate): its metric helpers on hand-made numbers, the seed
guard, a quick run against the bundled model, and the model card's generated block."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from model_export import card, scoring, seeds
from model_export import cohorts as co
from model_export import evaluate as ev
from model_export.metrics import dilate, roc_auc
from tests.conftest import DICOM_SAMPLES, REPO, STRICT, require

EVALUATION_JSON = REPO / "docs" / "evaluation" / "evaluation.json"
MODEL = REPO / "service" / "models" / "flaircad-demo.onnx"


# --------------------------------------------------------------------------------------------
# Metric helpers
# --------------------------------------------------------------------------------------------


def test_ece_by_hand() -> None:
    # one series per bin: confidences 0.95 (right), 0.85 (wrong), 0.75 (right), 0.65 (right)
    probs = [[0.95, 0.05], [0.15, 0.85], [0.25, 0.75], [0.65, 0.35]]
    labels = [0, 0, 1, 0]
    table = scoring.reliability(probs, labels)
    assert table.ece == pytest.approx((0.05 + 0.85 + 0.25 + 0.35) / 4)
    assert table.counts == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert table.accuracy[8] == 0.0 and table.confidence[8] == pytest.approx(0.85)
    # two in one bin: mean confidence 0.95, accuracy 1/2; a confidence of 1 is in the last bin
    two = scoring.reliability([[0.9, 0.1], [1.0, 0.0]], [0, 1])
    assert two.counts[9] == 2 and two.ece == pytest.approx(0.45)
    assert scoring.reliability([[0.5, 0.5]], [0]).counts[5] == 1


def test_brier_by_hand() -> None:
    assert scoring.brier([1.0, 0.0, 0.5], [1, 0, 1]) == pytest.approx(0.25 / 3)
    assert scoring.brier([0.2, 0.9], [True, False]) == pytest.approx((0.64 + 0.81) / 2)


def test_uncalibrated_probabilities_undo_the_temperature() -> None:
    raw = np.array([[2.0, -1.0], [0.3, 0.1]])
    t = 4.0
    back = scoring.uncalibrated_probabilities(raw / t, t)
    expected = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(back, expected, rtol=1e-12)


def test_bootstrap_auc_by_hand() -> None:
    # positives 0.9, 0.8, 0.4 against negatives 0.5, 0.3, 0.1: 8 of 9 pairs in order
    scores = [0.9, 0.8, 0.4, 0.5, 0.3, 0.1]
    positives = [True, True, True, False, False, False]
    auc, low, high = scoring.bootstrap_auc(scores, positives, resamples=1000, seed=3)
    assert auc == pytest.approx(8 / 9) == roc_auc(scores, positives)
    assert 0.0 <= low <= auc <= high <= 1.0 and low < high
    assert scoring.bootstrap_auc(scores, positives, resamples=1000, seed=3) == (auc, low, high)
    # ties count one half; perfectly separated scores give a degenerate interval at 1
    assert scoring.bootstrap_auc([0.5, 0.5], [True, False], resamples=10)[0] == 0.5
    assert scoring.bootstrap_auc([0.9, 0.8, 0.1], [True, True, False], resamples=50)[1:] \
        == (1.0, 1.0)
    assert all(math.isnan(v) for v in scoring.bootstrap_auc([0.2, 0.4], [True, True]))


def test_bootstrap_is_stratified() -> None:
    """A resample that dropped a class would make AUC undefined; each keeps both classes'
    counts, so the interval's width shrinks with n as 1/sqrt(n)."""
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 640):
        y = np.arange(n) % 2 == 0
        s = rng.normal(size=n) + 1.5 * y
        _, low, high = scoring.bootstrap_auc(s, y, resamples=1000, seed=1)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5


def test_dilate_ellipse() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[20, 20] = True
    for r in (1, 3, 8):
        np.testing.assert_array_equal(scoring.dilate_ellipse(mask, r, r), dilate(mask, r))
    # 7.5 mm on 1.2 mm rows and 0.6 mm columns: 6 rows up, 12 columns across
    grown = scoring.dilate_ellipse(mask, 7.5 / 1.2, 7.5 / 0.6)
    assert grown[14, 20] and not grown[13, 20] and grown[20, 8] and not grown[20, 7]


def test_map_stats_by_hand() -> None:
    shape = (3, 32, 32)
    lesion = np.zeros(shape, dtype=bool)
    brain = np.zeros(shape, dtype=bool)
    brain[:, 4:28, 4:28] = True
    cam = np.zeros(shape)
    lesion[0, 10, 10] = True
    cam[0, 10, 17] = 1.0  # 7 px = 7 mm from the lesion at 1 mm pixels: a hit
    lesion[1, 10, 10] = True  # map all zero on this slice: a miss
    cam[2, 1, 16] = 3.0  # no lesion; the peak lies 1 px from the top edge
    cam[2, 16, 16] = 1.0
    stats = scoring.map_stats(cam, lesion, brain, pixel_mm=(1.0, 1.0), radius_mm=7.5)
    assert (stats.hits, stats.lesion_slices, stats.lesion_slices_not_shown) == (1, 2, 1)
    assert (stats.edge_peaks, stats.peak_slices) == (1, 2)
    assert stats.mass_in_brain == pytest.approx(2.0 / 5.0)
    # a map below 1/255 of the volume's peak is invisible in the overlay: it cannot hit, and
    # where its argmax falls (here the edge) counts only in edge_peaks_any
    faint = cam.copy()
    faint[1, 0, 10] = 1e-3
    faint[1, 10, 10] = 0.5e-3
    dim = scoring.map_stats(faint, lesion, brain, pixel_mm=(1.0, 1.0))
    assert (dim.hits, dim.lesion_slices, dim.edge_peaks, dim.peak_slices) == (1, 2, 1, 2)
    assert (dim.edge_peaks_any, dim.peak_slices_any) == (2, 3)
    assert dim.lesion_slices_not_shown == 1
    faint[1, 0, 10] = 0.02  # now visible (≥ 3/255), peak on the edge, not in the lesion
    assert scoring.map_stats(faint, lesion, brain, pixel_mm=(1.0, 1.0)).edge_peaks == 2
    # at 2 mm pixels the radius is 3.75 px: 7 px away is a miss
    coarse = scoring.map_stats(cam, lesion, brain, pixel_mm=(2.0, 2.0), radius_mm=7.5)
    assert coarse.hits == 0
    assert scoring.map_stats(np.zeros(shape), lesion, brain, pixel_mm=(1, 1)).mass_in_brain \
        is None


def test_targets_met_and_missed_by() -> None:
    assert scoring.Target("auc", "test", 0.97, 0.98, True).to_dict()["missed_by"] \
        == pytest.approx(0.01)
    assert scoring.Target("ece", "test", 0.04, 0.05, False).to_dict()["met"] is True
    edge = scoring.Target("edge", "test", 0.05, 0.05, False, strict=True).to_dict()
    assert edge["met"] is False and edge["op"] == "<"
    assert scoring.Target("x", "test", None, 0.5, True).to_dict()["met"] is None
    # equal to the goal but for float rounding: met, not "missed by 0.000"
    exact = scoring.Target("ba", "test", (0.94 + 0.92) / 2, 0.93, True).to_dict()
    assert (0.94 + 0.92) / 2 < 0.93 and exact["met"] is True and exact["missed_by"] == 0.0
    assert scoring.Target("ba", "test", 0.9299, 0.93, True).to_dict()["met"] is False


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def test_cohort_seeds_are_evaluation_seeds() -> None:
    every = [c.seed(i) for c in co.COHORTS for i in range(c.n)]
    assert len(set(every)) == len(every)
    seeds.assert_disjoint(every, "evaluation")
    assert len({c.index for c in co.COHORTS}) == len(co.COHORTS)


def test_seed_check_refuses_what_the_model_says_it_trained_on() -> None:
    ours = [co.BY_NAME["test"].seed(i) for i in range(4)]
    record = ev.check_seeds(ours, {"seeds": {"classifier": [1_000_000, 2_000_000]}})
    assert record["checked_against_model"] == {"model:classifier": [1_000_000, 2_000_000]}
    # a model whose training claims the evaluation block (under any name, even "evaluation")
    for name in ("classifier", "evaluation"):
        with pytest.raises(AssertionError, match="also used for"):
            ev.check_seeds(ours, {"seeds": {name: [5_000_000, 5_010_000]}})
    with pytest.raises(AssertionError, match="not a evaluation seed"):
        ev.check_seeds([seeds.classifier_seed(0, 3)], {})
    with pytest.raises(AssertionError, match="twice"):
        ev.check_seeds([ours[0], ours[0]], {})


def test_evaluate_checks_seeds_before_scoring(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    info = SimpleNamespace(class_names=("MS", "cSVD"),
                           training_summary={"seeds": {"classifier": [5_000_000, 5_000_004]}})
    monkeypatch.setattr(ev, "Engine", lambda *_: SimpleNamespace(info=info))

    def never(*_: Any) -> Any:
        raise AssertionError("scored before the seeds were checked")

    monkeypatch.setattr(ev, "run_jobs", never)
    with pytest.raises(AssertionError, match=r"seed 5000000 \(evaluation\) is also used for"):
        ev.evaluate(MODEL, tmp_path, quick=True, workers=1, samples=None)


# --------------------------------------------------------------------------------------------
# A quick run against the bundled model, and the card
# --------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require(importlib.util.find_spec("matplotlib"), "matplotlib is not installed (train extra)")
    out = tmp_path_factory.mktemp("evaluation")
    samples = DICOM_SAMPLES if DICOM_SAMPLES.is_dir() else None
    report = ev.evaluate(MODEL, out, quick=True, workers=2, samples=samples)
    assert json.loads((out / "evaluation.json").read_text()) == report
    report["_out"] = str(out)
    return report


def test_quick_run_structure(quick_report: dict[str, Any]) -> None:
    r = quick_report
    assert r["schema"] == ev.SCHEMA and r["settings"]["quick"]
    assert set(r) >= {"model", "settings", "seeds", "cohorts", "targets", "figures", "timing"}
    assert r["model"]["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert r["seeds"]["cohorts"] == {"test": [5_000_000, 5_000_004], "t1": [5_090_000, 5_090_004]}
    test = r["cohorts"]["test"]
    assert test["n"] == {"MS": 2, "cSVD": 2, "total": 4}
    c = test["classification"]
    for key in ("auc", "balanced_accuracy", "balanced_accuracy_chance_adjusted", "sensitivity",
                "specificity", "brier", "ece"):
        assert _finite(c[key]), key
    assert all(_finite(v) for v in (*c["auc_ci95"], *c["uncalibrated"].values()))
    assert c["auc_ci95"][0] <= c["auc"] <= c["auc_ci95"][1]
    assert sum(c["reliability"]["calibrated"]["counts"]) == 4
    for name in co.MAPS:
        m = test["maps"][name]
        for cls in ("MS", "cSVD"):
            assert m["pointing"][cls]["lesion_slices"] > 0
            assert 0.0 <= m["pointing"][cls]["rate"] <= 1.0
        assert 0.0 <= m["mass_in_brain"] <= 1.0 and 0.0 <= m["edge_peaks"]["rate"] <= 1.0
    for name in ("test", "t1"):
        ood = r["cohorts"][name]["ood"]
        assert ood["n"] == 4 and all(_finite(ood[k]) for k in ("flag_rate", "median", "p5", "p95"))
        assert len(r["cohorts"][name]["series"]) == 4
    assert r["cohorts"]["t1"]["classification"] is None
    assert {t["name"] for t in r["targets"]} >= {"AUC (MS positive)", "OOD flag rate"}
    assert all(t["met"] in (True, False) for t in r["targets"])
    for name in r["figures"].values():
        if name.endswith(".png"):
            size = (Path(r["_out"]) / name).stat().st_size
            assert 0 < size <= 150_000, (name, size)


def test_quick_run_scores_the_real_series(quick_report: dict[str, Any]) -> None:
    real = quick_report["cohorts"]["real"]
    if not DICOM_SAMPLES.is_dir():
        assert not STRICT, f"{DICOM_SAMPLES} is absent (FLAIRCAD_STRICT_TESTS=1)"
        assert real["available"] is False and "absent" in real["note"]
        pytest.skip(f"{DICOM_SAMPLES} is absent: the real series were not scored")
    assert real["available"] and real["ood"]["n"] == len(real["sources"]) == 5
    reads = {name: s["read"] for name, s in real["sources"].items()}
    assert reads["siemens_xa30_t1w_mprage_enhanced"] == "dicom"
    assert reads["ge_mr750_epi_fmri_4d"] == "reference NIfTI"
    assert all(_finite(row["ood_score"]) for row in real["series"])


def test_card_block_round_trip(quick_report: dict[str, Any]) -> None:
    block = card.render_block(quick_report)
    assert "**Quick run**" in block and "| `test` |" in block
    text = card.with_block((REPO / "MODEL_CARD.md").read_text(), block)
    assert card.extract_block(text) == block
    assert card.with_block(text, block) == text  # idempotent; the rest of the card is kept
    assert text.count(card.BEGIN) == 1 and "## Limitations" in text


def test_model_card_block_is_rendered_from_the_committed_json() -> None:
    if not EVALUATION_JSON.exists():
        pytest.skip(f"{EVALUATION_JSON.relative_to(REPO)} does not exist yet: `make model` "
                    "writes it (and the card's block)")
    report = json.loads(EVALUATION_JSON.read_text())
    block = card.extract_block((REPO / "MODEL_CARD.md").read_text())
    assert block is not None, f"MODEL_CARD.md lacks the {card.BEGIN} … {card.END} block"
    assert block == card.render_block(report), (
        "MODEL_CARD.md's evaluation block differs from docs/evaluation/evaluation.json: "
        "run `python -m model_export.evaluate --card-only`, never edit the block by hand")


def test_committed_evaluation_is_of_the_bundled_model() -> None:
    if not EVALUATION_JSON.exists():
        pytest.skip(f"{EVALUATION_JSON.relative_to(REPO)} does not exist yet")
    report = json.loads(EVALUATION_JSON.read_text())
    assert not report["settings"]["quick"], "the committed evaluation is a --quick run"
    assert report["model"]["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest(), (
        "the bundled model changed since its evaluation: run `make model` (or "
        "`python -m model_export.evaluate`)")
