"""Metrics, logs and request ids of a real ``flaircad serve`` over one full run.

The module fixture runs the flow once against a subprocess server and keeps a scrape after
each step and the captured logs: a STOW-RS push and its analysis, a synchronous analysis, a
non-FLAIR series (rejected), malformed requests, a refused instance, paths and queries that
hold identifiers. The phantoms carry made-up patient identifiers (name, ID, an invalid birth
date that makes pydicom warn with the value, accession number) that must never be logged.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from service.pipeline.analysis import STAGES
from service.runtime.app import create_app
from tests._server import (
    Identifiers,
    Samples,
    ServerProcess,
    parse_samples,
    related,
    scrape,
    total,
    value,
    wait_for_study,
    with_identifiers,
)
from tests.conftest import PhantomFactory, require

STOW_ROUTE = "/dicomweb/studies/{study}"
COMMON_KEYS = {"timestamp", "level", "logger", "event", "pid"}


@dataclass
class Flow:
    ids: Identifiers
    uids: set[str]
    scrapes: dict[str, Samples] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    exit_status: int | None = None


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, phantom_series: PhantomFactory) -> Flow:
    root = tmp_path_factory.mktemp("operations")
    ids = Identifiers()
    stow_files = with_identifiers(phantom_series(label="MS", seed=41), root / "stow", ids)
    sync_files = with_identifiers(phantom_series(label="cSVD", seed=42), root / "sync", ids)
    rejected_files = with_identifiers(
        phantom_series(label="MS", seed=43), root / "rejected", ids,
        SeriesDescription="t1_mprage_sag", ProtocolName="t1_mprage_sag",
        SequenceName="tfl3d1", ScanningSequence="GR", InversionTime=900)
    uids: set[str] = set()
    for path in [*stow_files, *sync_files, *rejected_files]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    result = Flow(ids, uids)
    study = str(pydicom.dcmread(stow_files[0], stop_before_pixels=True).StudyInstanceUID)

    server = ServerProcess(root / "server", env={
        "FLAIRCAD_STABILITY_WINDOW_S": "1.0", "FLAIRCAD_SPOOL_SCAN_INTERVAL_S": "0",
        "FLAIRCAD_LOG_LEVEL": "debug"}).start()
    url = server.url
    try:
        result.scrapes["start"] = scrape(url)
        body, headers = related([p.read_bytes() for p in stow_files])
        stow = httpx.post(f"{url}/dicomweb/studies/{study}", content=body, timeout=60,
                          headers={**headers, "X-Request-ID": "ops-test-stow-0001"})
        assert stow.status_code == 200, stow.text
        result.facts["stow_request_id"] = stow.headers.get("x-request-id")
        result.facts["stow_instances"] = len(stow_files)
        result.facts["stow_bytes"] = sum(p.stat().st_size for p in stow_files)
        result.scrapes["stowed"] = scrape(url)

        (analysis,) = wait_for_study(url, study)
        assert analysis["status"] == "done", analysis
        result.facts["stow_prediction"] = analysis["prediction"]
        result.scrapes["stow_analysed"] = scrape(url)

        body, headers = related([p.read_bytes() for p in sync_files])
        sync = httpx.post(f"{url}/v1/analyses", content=body, headers=headers, timeout=120)
        assert sync.status_code == 200, sync.text
        result.facts["sync_prediction"] = sync.json()["prediction"]
        result.facts["sync_instances"] = len(sync_files)
        result.facts["generated_request_id"] = sync.headers.get("x-request-id")

        body, headers = related([p.read_bytes() for p in rejected_files])
        rejected = httpx.post(f"{url}/v1/analyses", content=body, timeout=120,
                              headers={**headers, "X-Request-ID": ids.patient_id + "<>"})
        assert rejected.status_code == 422 and rejected.json()["code"] == "not_flair"
        result.facts["insane_request_id_echo"] = rejected.headers.get("x-request-id")
        result.scrapes["uploads"] = scrape(url)

        malformed = httpx.post(f"{url}/v1/analyses", content=b"garbage", timeout=30, headers={
            "Content-Type": "multipart/related; type=application/dicom; boundary=zz"})
        assert malformed.status_code == 400
        body, headers = related([b"not dicom at all"])
        refused = httpx.post(f"{url}/dicomweb/studies", content=body, headers=headers)
        assert refused.status_code == 409
        # identifiers in paths and queries: answered, and logged by route template only
        missing = httpx.get(f"{url}/v1/analyses/{ids.patient_id}")
        assert missing.status_code == 404
        listed = httpx.get(f"{url}/v1/analyses", params={"study_instance_uid": study})
        assert listed.status_code == 200
        unknown = httpx.get(f"{url}/no/such/{ids.accession_number}")
        assert unknown.status_code == 404
        final = httpx.get(url + "/metrics")
        result.texts["final"] = final.text
        result.scrapes["final"] = parse_samples(final.text)
        result.facts["model"] = httpx.get(url + "/v1/model").json()
    finally:
        result.exit_status = server.stop()
    result.log_lines = server.log_lines()
    return result


# -- metrics -------------------------------------------------------------------------------------
def test_a_stow_push_counts_its_instances_and_opens_a_stability_window(flow: Flow) -> None:
    before, after = flow.scrapes["start"], flow.scrapes["stowed"]
    n = flow.facts["stow_instances"]
    received = "flaircad_instances_received_total"
    assert value(after, received, source="stow") - value(before, received, source="stow") == n
    count = "flaircad_http_request_duration_seconds_count"
    assert (value(after, count, route=STOW_ROUTE, method="POST", status="200")
            - value(before, count, route=STOW_ROUTE, method="POST", status="200")) == 1
    assert value(after, "flaircad_series_in_stability_window") == 1
    assert total(after, "flaircad_instances_refused_total") == total(
        before, "flaircad_instances_refused_total")
    incoming = value(after, "flaircad_spool_bytes", area="incoming")
    assert incoming - value(before, "flaircad_spool_bytes", area="incoming") >= flow.facts[
        "stow_bytes"]
    assert value(after, "flaircad_spool_free_bytes") > 0


def test_an_analysis_counts_its_outcome_class_stages_and_queue_wait(flow: Flow) -> None:
    before, after = flow.scrapes["stowed"], flow.scrapes["stow_analysed"]

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("flaircad_series_analysed_total", outcome="ok") == 1
    assert total(after, "flaircad_series_analysed_total") - total(
        before, "flaircad_series_analysed_total") == 1
    prediction = flow.facts["stow_prediction"]
    assert delta("flaircad_predictions_total", **{"class": prediction}) == 1
    for stage in STAGES:
        assert delta("flaircad_stage_duration_seconds_count", stage=stage) == 1, stage
        assert delta("flaircad_stage_duration_seconds_sum", stage=stage) > 0, stage
        assert delta("flaircad_stage_duration_seconds_bucket", stage=stage, le="+Inf") == 1
    assert delta("flaircad_queue_wait_seconds_count") == 1
    assert value(after, "flaircad_queue_depth") == 0
    assert value(after, "flaircad_inferences_in_flight") == 0
    assert value(after, "flaircad_series_in_stability_window") == 0
    assert value(after, "flaircad_spool_bytes", area="results") > 0


def test_uploads_rejections_and_refusals_are_counted(flow: Flow) -> None:
    before, uploads, final = (flow.scrapes["stow_analysed"], flow.scrapes["uploads"],
                              flow.scrapes["final"])

    def delta(a: Samples, b: Samples, name: str, **labels: str) -> float:
        return value(b, name, **labels) - value(a, name, **labels)

    n = flow.facts["sync_instances"]
    received = "flaircad_instances_received_total"
    assert delta(before, uploads, received, source="upload") == 2 * n  # sync + rejected
    outcome = "flaircad_series_analysed_total"
    assert delta(before, uploads, outcome, outcome="ok") == 1
    assert delta(before, uploads, outcome, outcome="rejected:not_flair") == 1
    assert delta(before, uploads, "flaircad_predictions_total",
                 **{"class": flow.facts["sync_prediction"]}) == 1
    # stage timings are those of analyses that finished ok
    assert delta(before, uploads, "flaircad_stage_duration_seconds_count", stage="total") == 1
    assert delta(before, uploads, "flaircad_queue_wait_seconds_count") == 2

    assert delta(uploads, final, "flaircad_instances_refused_total", reason="not_dicom") == 1
    assert delta(uploads, final, received, source="stow") == 1
    count = "flaircad_http_request_duration_seconds_count"
    assert delta(uploads, final, count, route="/v1/analyses", method="POST", status="400") == 1
    assert delta(uploads, final, count, route="/dicomweb/studies", method="POST",
                 status="409") == 1
    assert delta(uploads, final, count, route="/v1/analyses/{analysis_id}", method="GET",
                 status="404") == 1
    assert delta(uploads, final, count, route="unmatched", method="GET", status="404") == 1


def test_route_labels_are_templates_never_raw_paths(flow: Flow) -> None:
    routes = {dict(labels)["route"] for (name, labels) in flow.scrapes["final"]
              if name == "flaircad_http_request_duration_seconds_count"}
    templates = set(create_app().openapi()["paths"])
    assert STOW_ROUTE in routes
    assert routes <= templates | {"unmatched"}, routes - templates


def test_model_info_names_the_model_and_provider_in_use(flow: Flow) -> None:
    model = flow.facts["model"]
    info = {dict(labels)["provider"]: v for (name, labels), v in flow.scrapes["final"].items()
            if name == "flaircad_model_info"}
    assert info == {model["provider"]: 1.0}
    labels = {"name": model["name"], "version": model["version"],
              "provider": model["provider"]}
    assert value(flow.scrapes["final"], "flaircad_model_info", **labels) == 1


def test_promtool_check_metrics_is_silent_on_a_live_scrape(flow: Flow, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool, "promtool is not on PATH (apt-get install prometheus)")
    assert promtool is not None
    text = flow.texts["final"]
    assert "flaircad_stage_duration_seconds_bucket" in text  # taken after analyses
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", (
        checked.stdout + checked.stderr)


# -- logs and request ids -------------------------------------------------------------------------
def test_every_log_line_is_one_json_object_with_the_common_keys(flow: Flow) -> None:
    assert flow.log_lines, "the server logged nothing"
    for line in flow.log_lines:
        record = json.loads(line)
        assert isinstance(record, dict)
        assert set(record) >= COMMON_KEYS, record
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", record["timestamp"])


def test_requests_and_analyses_are_logged_with_ids_outcomes_and_timings(flow: Flow) -> None:
    records = [json.loads(line) for line in flow.log_lines]
    requests = [r for r in records if r["logger"] == "service.access"]
    for record in requests:
        assert {"request_id", "method", "route", "status", "duration_ms"} <= set(record)
    stow = [r for r in requests if r["route"] == STOW_ROUTE]
    assert [r["request_id"] for r in stow] == ["ops-test-stow-0001"]
    finished = [r for r in records if r["event"] == "analysis finished"]
    outcomes = sorted(r["outcome"] for r in finished)
    assert outcomes == ["ok", "ok", "rejected:not_flair"]
    for record in finished:
        assert re.match(r"^[0-9a-f]{32}$", record["analysis_id"])
        assert "duration_ms" in record and "queue_wait_ms" in record
        if record["outcome"] == "ok":
            assert set(record["timings_ms"]) == set(STAGES)
    # a synchronous analysis logs the request id of the request that brought it
    upload = [r for r in finished if r["source"] == "upload" and r["outcome"] == "ok"]
    assert upload[0]["request_id"] == flow.facts["generated_request_id"]
    assert any(r["event"] == "drained: every accepted analysis has finished" for r in records)


def test_request_ids_are_echoed_when_sane_and_generated_otherwise(flow: Flow) -> None:
    assert flow.facts["stow_request_id"] == "ops-test-stow-0001"
    assert re.match(r"^[0-9a-f]{32}$", flow.facts["generated_request_id"])
    echoed = flow.facts["insane_request_id_echo"]
    assert re.match(r"^[0-9a-f]{32}$", echoed) and flow.ids.patient_id not in echoed


def test_no_patient_identifier_or_uid_is_ever_logged(flow: Flow) -> None:
    text = "\n".join(flow.log_lines)
    for needle in flow.ids.needles():
        assert needle not in text, f"{needle!r} is in the logs"
    # the phantom generator's own identifiers, in case a copy kept them
    assert "PHANTOM" not in text
    # the conservative choice: not even Study/Series/SOP Instance UIDs (service.runtime.logs)
    leaked = sorted(uid for uid in flow.uids if uid in text)
    assert leaked == []


def test_the_server_exits_cleanly_on_sigterm(flow: Flow) -> None:
    assert flow.exit_status in (0, -15), flow.exit_status
