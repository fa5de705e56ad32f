"""The model card's evaluation block and the evaluation's figures, rendered from its JSON only.

Nothing here computes a figure of merit: :func:`render_block` formats ``evaluation.json``, and a
test compares MODEL_CARD.md's block (between :data:`BEGIN` and :data:`END`) with it, so no
number in that block can be typed by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from service.core.contract import Explanation, Output

BEGIN = "<!-- evaluation:begin -->"
END = "<!-- evaluation:end -->"
HEADING = "## Evaluation (generated)"
CLASSES = ("MS", "cSVD")
MAP_LABELS = {Explanation.HIRESCAM.value: "HiResCAM", Explanation.GRADCAM.value: "Grad-CAM",
              Explanation.ATTENTION.value: "attention"}
FIGURES = {"reliability": "reliability.png", "roc": "roc.png", "ood": "ood_scores.png"}


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100.0 * value:.1f} %"


def _row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _classification_table(cohorts: dict[str, Any]) -> list[str]:
    rows = []
    for name, c in cohorts.items():
        m = c.get("classification")
        if not m:
            continue
        low, high = m["auc_ci95"]
        rows.append([
            f"`{name}`", c["description"], f"{c['n']['MS']}/{c['n']['cSVD']}",
            f"{_f(m['auc'])} [{_f(low)}, {_f(high)}]", _f(m["balanced_accuracy"]),
            _f(m["balanced_accuracy_chance_adjusted"]), _f(m["sensitivity"]),
            _f(m["specificity"]), f"{_f(m['uncalibrated']['brier'])} → {_f(m['brier'])}",
            f"{_f(m['uncalibrated']['ece'])} → {_f(m['ece'])}",
        ])
    return _table(["cohort", "acquisition", "n (MS/cSVD)", "AUC [95 % CI]", "BA",
                   "BA chance-adj.", "sens (MS)", "spec (cSVD)", "Brier before → after",
                   "ECE before → after"], rows)


def _pointing(p: dict[str, Any]) -> str:
    shown = f"; {p['not_shown']} not shown" if p.get("not_shown") else ""
    return f"{_pct(p['rate'])} ({p['hits']}/{p['lesion_slices']}{shown})"


def _map_table(cohorts: dict[str, Any]) -> list[str]:
    rows = []
    for name, c in cohorts.items():
        if c["kind"] != "classification":
            continue
        shown = list(MAP_LABELS) if name == "test" else [Explanation.HIRESCAM.value]
        for map_name in shown:
            m = c["maps"][map_name]
            edge, edge_any = m["edge_peaks"], m["edge_peaks_any"]
            rows.append([f"`{name}`", MAP_LABELS[map_name], _pointing(m["pointing"]["MS"]),
                         _pointing(m["pointing"]["cSVD"]), _pct(m["mass_in_brain"]),
                         f"{_pct(edge['rate'])} ({edge['count']}/{edge['slices']})",
                         f"{_pct(edge_any['rate'])} ({edge_any['count']}/{edge_any['slices']})"])
    return _table(["cohort", "map", "pointing, MS", "pointing, cSVD", "mass in brain",
                   "peaks within 4 px of the edge (visible slices)",
                   "… (every non-zero slice)"], rows)


def _ood_rows(name: str, c: dict[str, Any]) -> list[list[Any]]:
    goal = {"must_flag": "≥ 90 % (together)", "no_goal": "none (outside the intended use)"}
    o = c["ood"]
    calls = c.get("predictions") or {}
    called = (f"{calls.get('called_MS', 0)}/{calls.get('called_cSVD', 0)}"
              if c["ood"]["n"] else "—")
    rows = [[f"`{name}`", c["description"], o["n"], o["flagged"], _pct(o["flag_rate"]),
             f"{_f(o['median'], 2)} [{_f(o['p5'], 2)}, {_f(o['p95'], 2)}]", called,
             "≤ 5 %" if name == "test" else goal.get(c["kind"], "—")]]
    for source, s in (c.get("sources") or {}).items():
        so = s["ood"]
        rows.append([f"↳ {source}", s["read"], so["n"], so["flagged"], _pct(so["flag_rate"]),
                     f"{_f(so['median'], 2)} [{_f(so['p5'], 2)}, {_f(so['p95'], 2)}]", "", ""])
    return rows


def _ood_table(cohorts: dict[str, Any]) -> list[str]:
    rows = [row for name, c in cohorts.items() for row in _ood_rows(name, c)]
    return _table(["cohort", "what", "n", "flagged", "flag rate", "score median [5 %, 95 %]",
                   "called MS/cSVD", "goal"], rows)


def _target_table(targets: list[dict[str, Any]]) -> list[str]:
    rows = []
    for t in targets:
        percent = "AUC" not in t["name"] and "ECE" not in t["name"] and "accuracy" not in t["name"]
        show = _pct if percent else _f
        state = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        missed = "" if t["met"] in (None, True) else (
            f"{100.0 * t['missed_by']:.1f} pp" if percent else _f(t["missed_by"]))
        rows.append([t["name"], f"`{t['cohort']}`", show(t["value"]),
                     f"{t['op']} {show(t['goal'])}", state, missed])
    return _table(["target", "cohort", "value", "goal", "met", "missed by"], rows)


def render_block(report: dict[str, Any]) -> str:
    """The markdown between the card's markers, from an evaluation report (its JSON)."""
    model, settings, seeds = report["model"], report["settings"], report["seeds"]
    cohorts, timing = report["cohorts"], report["timing"]
    checked = sorted({*seeds["checked_against_seeds_py"], *(seeds["checked_against_model"]
                                                             or {})})
    real = cohorts.get("real")
    lines = [
        "<!-- generated by `python -m model_export.evaluate` from "
        f"{report['figures'].get('folder', 'docs/evaluation')}/evaluation.json: do not edit -->",
        "",
        f"Model `{model['name']}` {model['version']} (`{model['path']}`, SHA-256 "
        f"`{model['sha256'][:16]}…`), temperature T = {model['temperature']:.3f}, OOD "
        f"threshold {model['ood_threshold']:.3f} ({model['ood_method']}). Every phantom went "
        "through the service's own path: DICOM files written, read back by the volume builder, "
        "preprocessed from the model's metadata, run by `service.pipeline.engine.Engine`, maps "
        "brought "
        "back to the source grid and scored there; the real series were read by the volume "
        "builder, or from their reference NIfTI where it rejects them (4D, mosaic)."
        + (" **Quick run** (reduced cohorts)." if settings["quick"] else ""),
        "",
        f"- **Seeds:** {seeds['n_seeds']} phantom seeds, all in the evaluation range "
        f"[{seeds['range'][0]:,}, {seeds['range'][1]:,}), asserted disjoint from "
        f"{', '.join(checked)}"
        + (f" ({seeds['note']})" if seeds.get("note") else "") + ". Per cohort: "
        + ", ".join(f"`{k}` [{a:,}, {b:,})" for k, (a, b) in seeds["cohorts"].items()) + ".",
        f"- **Definitions:** MS is the positive class. AUC interval: "
        f"{100 * settings['ci_level']:.0f} % "
        f"{settings['bootstrap']}, {settings['bootstrap_resamples']} resamples. ECE: "
        f"{settings['ece']}. Brier: {settings['brier']}. *Before* = uncalibrated "
        f"({settings['uncalibrated']}), *after* = the model's calibrated output.",
        f"- **Maps:** pointing = {settings['pointing']}; mass in brain = "
        f"{settings['mass_in_brain']}; edge = {settings['edge_peaks']}.",
        f"- **Run:** {timing['inputs']} inputs in {timing['wall_s']} s on "
        f"{timing['cpu_count']} CPU cores, {timing['workers']} worker process(es).",
    ]
    if real is not None and not real["available"]:
        lines.append(f"- **Real series:** {real['note']}.")
    lines += ["", "**Classification**", "", *_classification_table(cohorts),
              "", "**Explanation maps**", "", *_map_table(cohorts),
              "", f"**Out-of-distribution flag** (ood_score > {model['ood_threshold']:.3f})",
              "", *_ood_table(cohorts),
              "", "**Targets**", "", *_target_table(report["targets"]), ""]
    folder = report["figures"].get("folder", "docs/evaluation")
    titles = {"reliability": "Reliability of the test cohort, before and after calibration",
              "roc": "ROC of the test and shifted cohorts",
              "ood": "OOD scores: test vs must-flag inputs"}
    for key, title in titles.items():
        if key in report["figures"]:
            lines += [f"![{title}]({folder}/{report['figures'][key]})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def extract_block(text: str) -> str | None:
    """The card's text between the markers (None when the markers are absent)."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].removeprefix("\n")


def with_block(text: str, block: str) -> str:
    """``text`` with the block replaced, or inserted before "## Limitations" (else appended)."""
    wrapped = f"{BEGIN}\n{block}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + wrapped + rest.split(END, 1)[1]
    section = f"{HEADING}\n\n{wrapped}\n\n"
    if "\n## Limitations" in text:
        head, tail = text.split("\n## Limitations", 1)
        return head.rstrip("\n") + "\n\n" + section + "## Limitations" + tail
    return text.rstrip("\n") + "\n\n" + section


def update_card(card: Path, report: dict[str, Any]) -> None:
    card.write_text(with_block(card.read_text(), render_block(report)))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    _pyplot().close(fig)


def _reliability_figure(test: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    tables = test["classification"]["reliability"]
    width = 0.04
    for offset, (key, label, colour) in enumerate([("uncalibrated", "before (softmax(z·T))", "C1"),
                                                   ("calibrated", "after (model output)", "C0")]):
        t = tables[key]
        x = [c for c in t["confidence"] if c is not None]
        y = [a for a in t["accuracy"] if a is not None]
        top.plot(x, y, marker="o", color=colour, label=f"{label}, ECE {t['ece']:.3f}")
        for xi, yi, n in zip(x, y, [n for n in t["counts"] if n], strict=True):
            top.annotate(str(n), (xi, yi), textcoords="offset points", xytext=(4, -10),
                         fontsize=7, color=colour)
        lows = np.array(t["edges"][:-1])
        bottom.bar(lows + 0.01 + offset * width, t["counts"], width=width, color=colour,
                   align="edge")
    top.set(xlim=(0.45, 1.0), ylim=(0.0, 1.05), ylabel="accuracy",
            title=f"test cohort (n = {test['n']['total']}), top-label reliability")
    top.legend(fontsize=8, loc="upper left")
    bottom.set(xlabel="confidence of the predicted class (10 equal-width bins)",
               ylabel="series")
    _save(fig, path)


def _roc_points(scores: list[float], positives: list[bool]) -> tuple[list[float], list[float]]:
    s, y = np.asarray(scores), np.asarray(positives, dtype=bool)
    fpr, tpr = [0.0], [0.0]
    for threshold in np.unique(s)[::-1]:
        called = s >= threshold
        tpr.append(float((called & y).sum() / max(y.sum(), 1)))
        fpr.append(float((called & ~y).sum() / max((~y).sum(), 1)))
    return fpr, tpr


def _roc_figure(cohorts: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    for name, c in cohorts.items():
        if not c.get("classification"):
            continue
        series = c["series"]
        fpr, tpr = _roc_points([r["p_ms"] for r in series], [r["label"] == "MS" for r in series])
        ax.plot(fpr, tpr, linewidth=2.2 if name == "test" else 1.0,
                label=f"{name} (AUC {_f(c['classification']['auc'])})")
    ax.set(xlabel="1 − specificity (cSVD called MS)", ylabel="sensitivity (MS)",
           title="ROC, MS positive", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _ood_figure(cohorts: dict[str, Any], threshold: float, path: Path) -> None:
    plt = _pyplot()
    groups = {name: [r[Output.OOD_SCORE] for r in cohorts[name]["series"]]
              for name in ("test", "mass", "t1", "real") if name in cohorts}
    groups = {k: v for k, v in groups.items() if v}
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()]
                            + [np.array([threshold])])
    low, high = float(values.min()), float(values.max())
    fig, ax = plt.subplots(figsize=(6, 4))
    logarithmic = low > 0 and high / low > 20
    edges = (np.geomspace(low, high, 31) if logarithmic
             else np.linspace(low, high if high > low else low + 1.0, 31))
    for name, scores in groups.items():
        ax.hist(scores, bins=edges, histtype="step", linewidth=1.5,
                label=f"{name} (n={len(scores)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f}")
    if logarithmic:
        ax.set_xscale("log")
    ax.set(xlabel=Output.OOD_SCORE.value, ylabel="inputs", title="distance from the training data")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_figures(report: dict[str, Any], out: Path) -> dict[str, str]:
    """The PNGs that the report's data allow; file names by figure key."""
    cohorts = report["cohorts"]
    written: dict[str, str] = {}
    if cohorts.get("test", {}).get("classification"):
        _reliability_figure(cohorts["test"], out / FIGURES["reliability"])
        written["reliability"] = FIGURES["reliability"]
        _roc_figure(cohorts, out / FIGURES["roc"])
        written["roc"] = FIGURES["roc"]
    if any(cohorts.get(n, {}).get("series") for n in ("test", "mass", "t1", "real")):
        _ood_figure(cohorts, report["model"]["ood_threshold"], out / FIGURES["ood"])
        written["ood"] = FIGURES["ood"]
    return written
