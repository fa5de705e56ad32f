"""Prometheus metrics (prefix ``flaircad_``). Names are a contract with dashboards and alerts:
change them only with a release note."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_DURATION = Histogram(
    "flaircad_http_request_duration_seconds", "HTTP request duration by route template",
    ("route", "method", "status"), buckets=_LATENCY_BUCKETS)
STAGE_DURATION = Histogram(
    "flaircad_stage_duration_seconds", "Duration of each analysis stage",
    ("stage",), buckets=_LATENCY_BUCKETS)
SERIES_ANALYSED = Counter(
    "flaircad_series_analysed_total", "Series analysed, by outcome (ok, rejected:<code>, failed)",
    ("outcome",))
PREDICTIONS = Counter("flaircad_predictions_total", "Predictions by class", ("class",))
MODEL_INFO = Gauge("flaircad_model_info", "The loaded model (value 1)",
                   ("name", "version", "provider"))
QUEUE_DEPTH = Gauge("flaircad_queue_depth", "Analyses waiting for a worker")
QUEUE_WAIT = Histogram("flaircad_queue_wait_seconds", "Time from queueing to a worker",
                       buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("flaircad_inferences_in_flight", "Analyses running now")
SERIES_ARRIVING = Gauge("flaircad_series_in_stability_window",
                        "Series still receiving instances (inside the stability window)")
INSTANCES_RECEIVED = Counter("flaircad_instances_received_total",
                             "DICOM instances received, by source", ("source",))
INSTANCES_REFUSED = Counter("flaircad_instances_refused_total",
                            "DICOM instances refused, by reason", ("reason",))
