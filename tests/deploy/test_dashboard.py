"""The Grafana dashboard (``docker/grafana/dashboards/flaircad.json``) asks only for metrics
and labels the service exports, in PromQL that Prometheus parses; so do the alert rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.registry import Collector

from service.runtime import metrics
from tests.conftest import REPO, require

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "flaircad.json"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum"), "info": ("_info",)}
# Labels Prometheus adds at scrape time, and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "le"}
PROMETHEUS_OWN = {"up"}  # series Prometheus makes about a scrape, not the service's
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}
# Grafana's variables, for promtool: what they expand to in a query
GRAFANA = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "30s", "$job": ".*"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        match = re.match(r"^label_values\((\w+),\s*(\w+)\)$", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def _alert_exprs() -> list[str]:
    if not ALERTS.is_file():
        return []
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers that are not functions, keywords,
    label names or Grafana variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group(0) in KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def _fake_gpu() -> Collector:
    nvml = types.ModuleType("pynvml")
    memory = types.SimpleNamespace(used=1, total=2)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: memory  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=1)
    return metrics.GpuCollector(nvml, "handle", "0", "GPU-0")


def exported(tmp_path: Path) -> dict[str, set[str]]:
    """Every sample name the service can export, with its label names: the process registry
    (whether a labelled series has been used yet or not) and the scrape-time collectors."""
    families = list(REGISTRY.collect())
    families += list(metrics.SpoolCollector(tmp_path).collect())
    families += list(_fake_gpu().collect())
    names: dict[str, set[str]] = {}
    for family in families:
        labels = set(getattr(REGISTRY._names_to_collectors.get(family.name), "_labelnames", ()))
        labels |= {label for sample in family.samples for label in sample.labels}
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels
    return names


def test_the_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "flaircad" and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("request rate", "latency", "stage", "queue", "predictions by class",
                  "rejections by reason", "outcome", "provider", "gpu memory"):
        assert topic in titles, topic


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_ask_only_for_exported_metrics_and_labels(source: str, tmp_path: Path) -> None:
    exprs = _exprs(_dashboard()) if source == "dashboard" else _alert_exprs()
    if not exprs:
        pytest.skip(f"{ALERTS} is absent")
    available = exported(tmp_path)
    every_label = set().union(*available.values()) | TARGET_LABELS
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - set(available) - PROMETHEUS_OWN
        assert not unknown, f"{expr!r} asks for {sorted(unknown)}, not exported"
        assert grouping_labels(expr) <= every_label, expr
        used |= names
    if source == "dashboard":  # the dashboard shows what the issue asks for
        assert {"flaircad_http_request_duration_seconds_bucket",
                "flaircad_stage_duration_seconds_bucket", "flaircad_queue_depth",
                "flaircad_queue_wait_seconds_bucket", "flaircad_predictions_total",
                "flaircad_series_analysed_total", "flaircad_instances_refused_total",
                "flaircad_model_info", "flaircad_gpu_memory_used_bytes"} <= used


def test_metric_names_are_found_in_expressions() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(flaircad_http_request_duration_'
            'seconds_bucket{job=~"$job",route!="x"}[$__rate_interval]))) > 60 and up == 0')
    assert metric_names(expr) == {"flaircad_http_request_duration_seconds_bucket", "up"}
    assert grouping_labels(expr) == {"le", "route", "job"}


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool, "promtool is not on PATH (apt-get install prometheus)")
    assert promtool is not None
    rules = []
    for index, expr in enumerate(_exprs(_dashboard()) + _alert_exprs()):
        for variable, replacement in sorted(GRAFANA.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, replacement)
        rules.append({"record": f"flaircad:check:{index}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

