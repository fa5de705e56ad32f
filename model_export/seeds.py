"""Which phantom seeds serve which purpose: the ranges never overlap, and code asserts it.

A phantom is fixed by its (label, seed), so an honest figure needs seeds that nothing else has
used. Every consumer of phantoms draws from its own range here; :func:`assert_disjoint` is
what the evaluation and the bundled-model tests call before they score anything.

Pure Python (no numpy, no torch): the service's tests import it too.
"""

from __future__ import annotations

from collections.abc import Iterable

# Anything a test or a doc example makes for its own use (fixtures, tours, hostile corpora).
FIXTURES = range(0, 100_000)
# The two phantoms the export verifies the ONNX graph on.
EXPORT_CHECK = range(900_000, 901_000)
# The classifier cohort of `make model` (training, validation and its internal test split):
# CLASSIFIER.start + run_seed * 100_000 + i.
CLASSIFIER = range(1_000_000, 2_000_000)
# Held-out phantoms the evaluation scores (model_export.evaluate), one block per cohort.
EVALUATION = range(5_000_000, 6_000_000)
# Held-out phantoms the bundled-model tests score (tests/integration/test_analyze.py and friends).
HELD_OUT_TESTS = range(7_000_000, 7_100_000)
# Backbone pretraining on lesion descriptors: (PRETRAIN_BLOCK + run_seed) * 100_000 + i.
PRETRAIN = range(9_000_000, 10_000_000)
PRETRAIN_BLOCK = PRETRAIN.start // 100_000

# Seeds a trained model has seen, by the purpose that saw them.
SEEN_IN_TRAINING = {"classifier": CLASSIFIER, "pretrain": PRETRAIN, "export_check": EXPORT_CHECK}
RANGES = {"fixtures": FIXTURES, "export_check": EXPORT_CHECK, "classifier": CLASSIFIER,
          "evaluation": EVALUATION, "held_out_tests": HELD_OUT_TESTS, "pretrain": PRETRAIN}


def classifier_seed(run_seed: int, index: int) -> int:
    seed = CLASSIFIER.start + run_seed * 100_000 + index
    if seed not in CLASSIFIER or index >= 100_000:
        raise ValueError(f"classifier seed out of range: run {run_seed}, index {index}")
    return seed


def evaluation_seed(cohort: int, index: int) -> int:
    """Cohort ``cohort`` (0, 1, …) of the evaluation, phantom ``index`` (< 10,000)."""
    if not 0 <= index < 10_000:
        raise ValueError(f"evaluation index out of range: {index}")
    seed = EVALUATION.start + cohort * 10_000 + index
    if seed not in EVALUATION:
        raise ValueError(f"evaluation cohort out of range: {cohort}")
    return seed


def held_out_test_seed(index: int) -> int:
    seed = HELD_OUT_TESTS.start + index
    if seed not in HELD_OUT_TESTS:
        raise ValueError(f"held-out test index out of range: {index}")
    return seed


def purposes_of(seed: int) -> list[str]:
    return [name for name, span in RANGES.items() if seed in span]


def assert_disjoint(seeds: Iterable[int], purpose: str,
                    seen: dict[str, range] | None = None) -> None:
    """Raise unless every seed lies in ``RANGES[purpose]`` and in none of ``seen`` (default:
    every other range). ``seen`` lets a caller name the ranges a model's metadata reports."""
    own = RANGES[purpose]
    others = seen if seen is not None else {k: v for k, v in RANGES.items() if k != purpose}
    for seed in seeds:
        if seed not in own:
            raise AssertionError(f"seed {seed} is not a {purpose} seed ({own})")
        clash = [name for name, span in others.items() if seed in span and name != purpose]
        if clash:
            raise AssertionError(f"seed {seed} ({purpose}) is also used for {clash}")


def describe() -> dict[str, list[int]]:
    """The ranges as [start, stop) pairs, for metadata and reports."""
    return {name: [span.start, span.stop] for name, span in RANGES.items()}
