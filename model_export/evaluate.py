"""An evaluation that can't flatter itself: held-out phantoms through the service's code path.

``python -m model_export.evaluate --model service/models/flaircad-demo.onnx --out
docs/evaluation`` scores every cohort of :data:`model_export.cohorts.COHORTS` (held-out test,
shifted acquisitions, inputs that must be flagged as out of distribution) and the real scanner
series of ``../shared/dicom-samples``, writes ``evaluation.json`` and PNG figures into
``--out``, and regenerates the block of MODEL_CARD.md between the evaluation markers from that
JSON. ``--card-only`` re-renders the card from the existing JSON.

Before anything is scored, every phantom seed is checked to lie in ``seeds.EVALUATION`` and in
no range that seeds.py or the model's own metadata says training saw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from model_export import cohorts as co
from model_export import seeds
from model_export.metrics import binary_metrics
from model_export.scoring import (
    BRIER_DEFINITION,
    ECE_DEFINITION,
    Target,
    bootstrap_auc,
    brier,
    distribution,
    rate,
    reliability,
    uncalibrated_probabilities,
)
from service.core.contract import Explanation, Output
from service.pipeline.engine import Engine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "dicom-samples"
SCHEMA = "flaircad-evaluation/1"
QUICK_COHORTS = ("test", "t1")
QUICK_N = 4
BOOTSTRAP_SEED = 20240115
CLASSES = ("MS", "cSVD")  # phantoms.CLASS_NAMES; MS (index 0) is the positive class


def model_seed_ranges(training_summary: dict[str, Any]) -> dict[str, range] | None:
    """The seed ranges a model's metadata says training used, as ``model:<name>`` ranges."""
    reported = training_summary.get("seeds")
    if not reported:
        return None
    return {f"model:{name}": range(int(span[0]), int(span[1]))
            for name, span in dict(reported).items()}


def check_seeds(all_seeds: Sequence[int], training_summary: dict[str, Any]) -> dict[str, Any]:
    """Raise AssertionError unless the seeds are unique, evaluation seeds, and outside every
    other range of seeds.py and every range the model reports; the record of what was checked."""
    if len(set(all_seeds)) != len(all_seeds):
        raise AssertionError("an evaluation seed is used twice")
    seeds.assert_disjoint(all_seeds, "evaluation")
    from_model = model_seed_ranges(training_summary)
    if from_model:
        seeds.assert_disjoint(all_seeds, "evaluation", from_model)
    return {
        "purpose": "evaluation",
        "range": [seeds.EVALUATION.start, seeds.EVALUATION.stop],
        "n_seeds": len(all_seeds),
        "checked_against_seeds_py": {k: v for k, v in seeds.describe().items()
                                     if k != "evaluation"},
        "checked_against_model": ({k: [v.start, v.stop] for k, v in from_model.items()}
                                  if from_model else None),
        "note": None if from_model else "the model's metadata reports no seed ranges",
    }


# --------------------------------------------------------------------------------------------
# Aggregation of per-series records
# --------------------------------------------------------------------------------------------


def classification(records: list[dict[str, Any]], temperature: float, *, resamples: int
                   ) -> dict[str, Any]:
    probs = np.array([r[Output.PROBABILITIES] for r in records], dtype=np.float64)
    labels = np.array([CLASSES.index(r["label"]) for r in records], dtype=np.int64)
    raw = uncalibrated_probabilities([r[Output.LOGITS] for r in records], temperature)
    is_ms = labels == 0
    base = binary_metrics(probs, labels, CLASSES, positive=0)
    auc, low, high = bootstrap_auc(probs[:, 0], is_ms, resamples=resamples, seed=BOOTSTRAP_SEED)
    after, before = reliability(probs, labels), reliability(raw, labels)
    return {
        "auc": auc, "auc_ci95": [low, high],
        "balanced_accuracy": base.balanced_accuracy,
        "balanced_accuracy_chance_adjusted": base.balanced_accuracy_chance_adjusted,
        "sensitivity": base.sensitivity, "specificity": base.specificity,
        "brier": brier(probs[:, 0], is_ms), "ece": after.ece,
        "uncalibrated": {"brier": brier(raw[:, 0], is_ms), "ece": before.ece},
        "reliability": {"calibrated": after.to_dict(), "uncalibrated": before.to_dict()},
    }


def map_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in co.MAPS:
        stats = [(r["label"], r["maps"][name]) for r in records]
        pointing = {}
        for cls in CLASSES:
            hits = sum(s["hits"] for label, s in stats if label == cls)
            slices = sum(s["lesion_slices"] for label, s in stats if label == cls)
            not_shown = sum(s.get("lesion_slices_not_shown", 0) for label, s in stats
                            if label == cls)
            pointing[cls] = {"hits": hits, "lesion_slices": slices, "rate": rate(hits, slices),
                             "not_shown": not_shown}
        masses = [s["mass_in_brain"] for _, s in stats if s["mass_in_brain"] is not None]
        edge = sum(s["edge_peaks"] for _, s in stats)
        peaks = sum(s["peak_slices"] for _, s in stats)
        edge_any = sum(s["edge_peaks_any"] for _, s in stats)
        peaks_any = sum(s["peak_slices_any"] for _, s in stats)
        out[name] = {
            "pointing": pointing,
            "mass_in_brain": float(np.mean(masses)) if masses else None,
            "empty_maps": len(stats) - len(masses),
            "edge_peaks": {"count": edge, "slices": peaks, "rate": rate(edge, peaks)},
            "edge_peaks_any": {"count": edge_any, "slices": peaks_any,
                               "rate": rate(edge_any, peaks_any)},
        }
    return out


def ood_summary(records: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    scores = [r[Output.OOD_SCORE] for r in records]
    flagged = sum(s > threshold for s in scores)
    return {"n": len(scores), "flagged": flagged, "flag_rate": rate(flagged, len(scores)),
            **distribution(scores)}


def predictions(records: list[dict[str, Any]]) -> dict[str, Any]:
    p_ms = [r[Output.PROBABILITIES][0] for r in records]
    called = [CLASSES[int(np.argmax(r[Output.PROBABILITIES]))] for r in records]
    return {"called_MS": called.count("MS"), "called_cSVD": called.count("cSVD"),
            "mean_p_ms": float(np.mean(p_ms)) if p_ms else None}


def series_rows(records: list[dict[str, Any]], temperature: float, threshold: float
                ) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        raw = uncalibrated_probabilities([r[Output.LOGITS]], temperature)[0]
        row: dict[str, Any] = {k: r[k] for k in ("seed", "label", "compress", "group",
                                                  "source", "time_index")
                               if r.get(k) is not None}
        if "source" in row:
            row["source"] = _shown(Path(row["source"]))
        row.update({"p_ms": round(r[Output.PROBABILITIES][0], 6),
                    "p_ms_uncalibrated": round(float(raw[0]), 6),
                    Output.OOD_SCORE.value: round(r[Output.OOD_SCORE], 5),
                    "flagged": bool(r[Output.OOD_SCORE] > threshold)})
        rows.append(row)
    return rows


def summarise_cohort(cohort: co.Cohort, records: list[dict[str, Any]], info: Any,
                     resamples: int) -> dict[str, Any]:
    temperature, threshold = info.calibration.temperature, info.distribution.threshold
    n = {cls: sum(r["label"] == cls for r in records) for cls in CLASSES}
    entry: dict[str, Any] = {
        "kind": cohort.kind, "description": cohort.description,
        "acquisition": cohort.acquisition(),
        "seed_range": [cohort.seed(0), cohort.seed(0) + len(records)],
        "n": {**n, "total": len(records)},
        "classification": (classification(records, temperature, resamples=resamples)
                           if cohort.kind == "classification" else None),
        "predictions": predictions(records),
        "maps": map_summary(records),
        "ood": ood_summary(records, threshold),
        "series": series_rows(records, temperature, threshold),
    }
    return entry


def summarise_real(records: list[dict[str, Any]], notes: list[dict[str, Any]] | None,
                   info: Any, note: str | None) -> dict[str, Any]:
    threshold = info.distribution.threshold
    by_source = {}
    for source in notes or []:
        mine = [r for r in records if r["group"] == source["source"]]
        by_source[source["source"]] = {**source, "ood": ood_summary(mine, threshold)}
    return {"kind": "must_flag", "description": "real scanner series (T1w MPRAGE, EPI fMRI)",
            "available": notes is not None, "note": note, "n": {"total": len(records)},
            "sources": by_source, "ood": ood_summary(records, threshold),
            "predictions": predictions(records),
            "series": series_rows(records, info.calibration.temperature, threshold)}


def targets(report_cohorts: dict[str, Any]) -> list[dict[str, Any]]:
    test = report_cohorts.get("test")
    out: list[Target] = []
    if test is not None:
        c, hires = test["classification"], test["maps"][Explanation.HIRESCAM]
        out += [Target("AUC (MS positive)", "test", c["auc"], 0.98, True),
                Target("balanced accuracy (plain)", "test", c["balanced_accuracy"], 0.93, True),
                Target("ECE (calibrated)", "test", c["ece"], 0.05, False)]
        out += [Target(f"HiResCAM pointing, {cls}", "test", hires["pointing"][cls]["rate"],
                       0.85, True) for cls in CLASSES]
        out += [Target("HiResCAM peaks within 4 px of the edge (visible slices)", "test",
                       hires["edge_peaks"]["rate"], 0.05, False, strict=True),
                Target("HiResCAM mass inside the brain", "test", hires["mass_in_brain"], 0.90,
                       True),
                Target("OOD flag rate", "test", test["ood"]["flag_rate"], 0.05, False)]
    must = [name for name, entry in report_cohorts.items() if entry["kind"] == "must_flag"
            and entry["ood"]["n"]]
    if must:
        flagged = sum(report_cohorts[m]["ood"]["flagged"] for m in must)
        total = sum(report_cohorts[m]["ood"]["n"] for m in must)
        out.append(Target("OOD flag rate on must-flag inputs", " + ".join(must),
                          rate(flagged, total), 0.90, True))
    return [t.to_dict() for t in out]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_jobs(jobs: list[co.Job], model: Path, workers: int) -> list[dict[str, Any]]:
    """Every job's record, in job order; the long jobs are started first."""
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k].cost)
    results: dict[int, dict[str, Any]] = {}
    if workers <= 1:
        co.init_worker(str(model))
        for k in order:
            results[k] = co.run_job(jobs[k])
    else:
        context = multiprocessing.get_context("spawn")  # no onnxruntime threads across fork
        with ProcessPoolExecutor(workers, mp_context=context, initializer=co.init_worker,
                                 initargs=(str(model),)) as pool:
            futures = {k: pool.submit(co.run_job, jobs[k]) for k in order}
            try:
                for done, (k, future) in enumerate(futures.items(), 1):
                    results[k] = future.result()
                    if done % 50 == 0:
                        print(f"evaluate: {done}/{len(jobs)} inputs", file=sys.stderr,
                              flush=True)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # fail now, not after the rest
                raise
    return [results[k] for k in range(len(jobs))]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(model: Path, out: Path, *, quick: bool = False, workers: int = 2,
             samples: Path | None = DEFAULT_SAMPLES, cohort_names: Iterable[str] | None = None,
             resamples: int | None = None, n: int | None = None) -> dict[str, Any]:
    """Score everything, write ``out/evaluation.json`` and the figures; the report."""
    start = time.perf_counter()
    engine = Engine(model, ["CPUExecutionProvider"])
    info = engine.info
    if list(info.class_names) != list(CLASSES):
        raise ValueError(f"the model's classes {info.class_names} are not {CLASSES}")
    names = list(cohort_names or (QUICK_COHORTS if quick else co.BY_NAME))
    chosen = [co.BY_NAME[name] for name in names if name != "real"]
    per_cohort = n if n is not None else (QUICK_N if quick else None)
    resamples = resamples or (200 if quick else 2000)
    jobs = [job for c in chosen for job in co.phantom_jobs(c, per_cohort)]
    seed_record = check_seeds([co.BY_NAME[j.cohort].seed(j.i) for j in jobs],
                              info.training_summary)
    seed_record["cohorts"] = {c.name: [c.seed(0), c.seed(0) + (per_cohort or c.n)]
                              for c in chosen}

    real_notes: list[dict[str, Any]] | None = None
    real_note = None
    want_real = cohort_names is None or "real" in names
    if want_real and samples is not None and samples.is_dir():
        real, real_notes = co.real_jobs(samples, first_only=quick)
        jobs += real
    elif want_real:
        real_note = (f"{_shown(samples)} is absent" if samples is not None
                     else "no sample folder was given") + ": the real series were not scored"

    records = run_jobs(jobs, model, workers)
    report_cohorts: dict[str, Any] = {}
    for c in chosen:
        mine = [r for r in records if r["cohort"] == c.name]
        report_cohorts[c.name] = summarise_cohort(c, mine, info, resamples)
    if want_real:
        report_cohorts["real"] = summarise_real([r for r in records if r["cohort"] == "real"],
                                                real_notes, info, real_note)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {"path": _shown(model), "sha256": sha256(model), "name": info.name,
                  "version": info.version, "class_names": list(info.class_names),
                  "positive_class": CLASSES[0],
                  "source_checkpoint_sha256": info.source_checkpoint_sha256,
                  "temperature": info.calibration.temperature,
                  "ood_method": info.distribution.method,
                  "ood_threshold": info.distribution.threshold},
        "settings": {"quick": quick, "bootstrap_resamples": resamples,
                     "bootstrap_seed": BOOTSTRAP_SEED, "ci_level": 0.95,
                     "bootstrap": "percentile, stratified by class",
                     "ece": ECE_DEFINITION, "brier": BRIER_DEFINITION,
                     "uncalibrated": "softmax(logits × T), T = the model's temperature",
                     "pointing_radius_mm": co.RADIUS_MM, "edge_px": co.EDGE_PX,
                     "pointing": "lesion slices of the source grid whose map peak lies in the "
                                 "lesion mask dilated by a 7.5 mm disc; a slice whose map is "
                                 "all zero or invisible (peak < 1/255 of the volume's peak, "
                                 "below what the overlay can show) misses and is counted as "
                                 "not shown",
                     "mass_in_brain": "share of the map's sum inside the brain mask, over the "
                                      "whole source volume, mean over series",
                     "edge_peaks": "source slices containing brain, with the map visible, whose "
                                   "map peak lies within 4 px of the image border "
                                   "(edge_peaks_any: over every slice with a non-zero map)",
                     "ood_flag": "ood_score > threshold", "workers": workers},
        "seeds": seed_record,
        "cohorts": report_cohorts,
        "targets": targets(report_cohorts),
        "figures": {},
        "timing": {"wall_s": None, "inputs": len(jobs), "workers": workers,
                   "cpu_count": os.cpu_count(),
                   "worker_s_by_cohort": {name: round(sum(r["seconds"] for r in records
                                                          if r["cohort"] == name), 1)
                                          for name in report_cohorts}},
    }
    report = clean(report)
    out.mkdir(parents=True, exist_ok=True)
    from model_export.card import write_figures

    report["figures"] = {"folder": _shown(out), **write_figures(report, out)}
    report["timing"]["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "evaluation.json").write_text(dumps(report))
    return report


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one line per key, except that every row of a ``series`` list is one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = []
        for key, item in value.items():
            if key == "series" and isinstance(item, list) and item:
                rows = ",\n".join(inner + "  " + _compact(row) for row in item)
                text = f"[\n{rows}\n{inner}]"
            else:
                text = dumps(item, indent + 1)
            items.append(f"{inner}{_compact(key)}: {text}")
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" + ("\n" if indent == 0 else "")
    return _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def _shown(path: Path) -> str:
    """A path relative to the repository where it lies inside the repository's parent (so the
    JSON is the same on every checkout), else absolute."""
    resolved = path.resolve()
    if resolved.is_relative_to(REPO.parent):
        return Path(os.path.relpath(resolved, REPO)).as_posix()
    return str(resolved)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model_export.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "service/models/flaircad-demo.onnx")
    p.add_argument("--out", type=Path, default=REPO / "docs/evaluation")
    p.add_argument("--card", type=Path, default=REPO / "MODEL_CARD.md",
                   help="the model card whose evaluation block is regenerated")
    p.add_argument("--no-card", action="store_true", help="leave the model card alone")
    p.add_argument("--card-only", action="store_true",
                   help="only re-render the card's block from OUT/evaluation.json")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_N} series per cohort, cohorts {', '.join(QUICK_COHORTS)}, "
                        "200 bootstrap resamples, one input per real source")
    p.add_argument("--cohorts", type=lambda s: [x for x in s.split(",") if x],
                   help=f"comma-separated subset of {', '.join([*co.BY_NAME, 'real'])}")
    p.add_argument("--n", type=int, help="series per cohort (default: each cohort's own size)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bootstrap", type=int, help="resamples (default 2000; 200 with --quick)")
    p.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    args = p.parse_args(argv)
    unknown = set(args.cohorts or []) - {*co.BY_NAME, "real"}
    if unknown:
        p.error(f"unknown cohorts {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from model_export.card import update_card

    args = parse_args(argv)
    if args.card_only:
        report = json.loads((args.out / "evaluation.json").read_text())
    else:
        report = evaluate(args.model, args.out, quick=args.quick, workers=args.workers,
                          samples=args.samples, cohort_names=args.cohorts,
                          resamples=args.bootstrap, n=args.n)
        print(f"evaluate: {report['timing']['inputs']} inputs in "
              f"{report['timing']['wall_s']} s -> {args.out / 'evaluation.json'}")
    if not args.no_card:
        update_card(args.card, report)
        print(f"evaluate: {args.card} regenerated from the evaluation")
    for t in report["targets"]:
        state = "met" if t["met"] else ("n/a" if t["met"] is None else
                                        f"missed by {t['missed_by']:.3g}")
        print(f"  {t['name']} ({t['cohort']}): {t['value']} {t['op']} {t['goal']}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
