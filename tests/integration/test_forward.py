"""Results sent to configured destinations: retries with backoff, state in the spool database
(a restart resumes), failures in ``GET /v1/analyses/{id}`` and ``/metrics``; and the DIMSE
listener with a pynetdicom client. No external tools: in-test STOW-RS and C-STORE receivers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from service.core.destinations import Destination
from service.intake.multipart import MediaType, boundary_of, parse_multipart
from service.runtime import audit
from service.runtime.forward import Forwarder
from service.storage.deliveries import DeliveryState, DeliveryStore
from tests._pacs import Flaircad, auth_headers, flaircad_settings, free_port, wait_until
from tests._server import parse_samples, value
from tests.conftest import PhantomFactory

SLICES = 12
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


# -- receivers --------------------------------------------------------------------------------
@dataclass
class StowReceiver:
    """A STOW-RS endpoint: records each request; answers ``status`` (200: all stored)."""

    port: int = field(default_factory=free_port)
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __enter__(self) -> StowReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                media = MediaType.parse(self.headers["Content-Type"])
                parts = parse_multipart(body, boundary_of(media))
                datasets = [pydicom.dcmread(BytesIO(p.body)) for p in parts]
                receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "datasets": datasets})
                key = "00081199" if receiver.status == 200 else "00081198"
                items = [{"00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                          **({} if key == "00081199" else
                             {"00081197": {"vr": "US", "Value": [0xA700]}})}
                         for ds in datasets]
                payload = json.dumps({key: {"vr": "SQ", "Value": items}}).encode()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"


@dataclass
class StoreReceiver:
    """A C-STORE SCP (pynetdicom) for the SC and SR flaircad sends."""

    port: int = field(default_factory=free_port)
    received: list[tuple[str, pydicom.Dataset]] = field(default_factory=list)
    server: Any = None

    def __enter__(self) -> StoreReceiver:
        from pynetdicom import AE, evt

        ae = AE(ae_title="RECEIVER")
        for sop_class in (SC_STORAGE, PARAMETRIC_MAP_STORAGE, COMPREHENSIVE_SR):
            ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def on_store(event: Any) -> int:
            calling = str(event.assoc.requestor.ae_title).strip()
            self.received.append((calling, event.dataset))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def _analyse(server: Flaircad, folder: Path) -> dict[str, Any]:
    """POST /v1/analyses (synchronous); the finished analysis."""
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in _files(folder)]
    response = httpx.post(server.url + "/v1/analyses", files=files, headers=auth_headers(),
                          timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _deliveries(server: Flaircad, analysis_id: str) -> dict[str, dict[str, Any]]:
    body = server.analysis(analysis_id)
    return {d["destination"]: d for d in body.get("deliveries") or []}


def _metrics(server: Flaircad) -> Any:
    response = httpx.get(server.url + "/metrics", headers=auth_headers(), timeout=30)
    assert response.status_code == 200
    return parse_samples(response.text)


@pytest.fixture
def started() -> Iterator[list[Flaircad]]:
    servers: list[Flaircad] = []
    yield servers
    for server in servers:
        server.stop()


# -- tests ------------------------------------------------------------------------------------
def test_pending_sends_retry_with_backoff_and_resume_after_a_restart(
        tmp_path: Path, phantom_series: PhantomFactory, started: list[Flaircad]) -> None:
    receiver_port = free_port()  # nothing listens there yet: connection refused
    destination = Destination(name="pacs", kind="stow",
                              url=f"http://127.0.0.1:{receiver_port}/dicom-web",
                              headers={"Authorization": "Bearer pacs-token"}, timeout_s=10)
    settings = flaircad_settings(tmp_path / "spool", destinations=[destination],
                                 delivery_backoff_s=0.3, delivery_backoff_max_s=0.6,
                                 delivery_max_attempts=1000)
    first = Flaircad(settings, free_port()).start()
    started.append(first)
    analysis = _analyse(first, phantom_series(label="MS", seed=81, slices=SLICES))

    def retried() -> dict[str, Any] | None:
        delivery = _deliveries(first, analysis["analysis_id"]).get("pacs")
        return delivery if delivery and delivery["attempts"] >= 2 else None

    delivery = wait_until(retried, 30, "two failed attempts")
    assert delivery["state"] == "pending" and delivery["kind"] == "stow"
    assert "Connect" in delivery["last_error"]
    assert delivery["next_attempt"] is not None
    samples = _metrics(first)
    assert value(samples, "flaircad_result_deliveries_total", destination="pacs", kind="stow",
                 outcome="retry") >= 2
    assert value(samples, "flaircad_result_delivery_states", destination="pacs",
                 state="pending") == 1
    first.stop()
    started.remove(first)
    attempts_before = _deliveries_in_db(settings.spool_dir, analysis["analysis_id"])

    # The PACS is back; a new process over the same spool resumes the send.
    with StowReceiver(port=receiver_port) as receiver:
        second = Flaircad(settings, free_port()).start()
        started.append(second)

        def sent() -> dict[str, Any] | None:
            delivery = _deliveries(second, analysis["analysis_id"]).get("pacs")
            return delivery if delivery and delivery["state"] == "sent" else None

        delivery = wait_until(sent, 30, "the resumed send")
        assert delivery["attempts"] == attempts_before + 1
        assert delivery["instances"] == SLICES + 2  # the SC series, the map and the SR
        assert delivery["last_error"] is None
        (request,) = receiver.requests
        assert request["path"] == "/dicom-web/studies"
        assert request["headers"]["Authorization"] == "Bearer pacs-token"
        sop_classes = [str(ds.SOPClassUID) for ds in request["datasets"]]
        assert sop_classes == [SC_STORAGE] * SLICES + [PARAMETRIC_MAP_STORAGE, COMPREHENSIVE_SR]
        uids = {str(ds.SOPInstanceUID) for ds in request["datasets"]}
        assert analysis["outputs"]["sr_sop_instance_uid"] in uids
        assert {str(ds.SeriesInstanceUID) for ds in request["datasets"]} == {
            analysis["outputs"]["secondary_capture_series_instance_uid"],
            analysis["outputs"]["parametric_map_series_instance_uid"],
            analysis["outputs"]["sr_series_instance_uid"]}
    # the restart did not analyse the series again
    assert [a["analysis_id"] for a in second.analyses(analysis["study_instance_uid"])] == [
        analysis["analysis_id"]]
    assert value(_metrics(second), "flaircad_result_deliveries_total", destination="pacs",
                 kind="stow", outcome="sent") >= 1


def _deliveries_in_db(spool: Path, analysis_id: str) -> int:
    store = DeliveryStore(spool / "flaircad.sqlite")
    try:
        (row,) = store.of_analysis(analysis_id)
        assert row.state is DeliveryState.PENDING
        return row.attempts
    finally:
        store.close()


def test_c_store_delivery_and_failures_that_give_up(
        tmp_path: Path, phantom_series: PhantomFactory, started: list[Flaircad]) -> None:
    with StoreReceiver() as store_receiver, StowReceiver(status=409) as refusing:
        destinations = [
            Destination(name="archive", kind="cstore", ae_title="RECEIVER", host="127.0.0.1",
                        port=store_receiver.port, timeout_s=10),
            Destination(name="nobody", kind="cstore", ae_title="NOBODY", host="127.0.0.1",
                        port=free_port(), timeout_s=5),
            Destination(name="refuses", kind="stow", url=refusing.url, timeout_s=10),
        ]
        settings = flaircad_settings(tmp_path / "spool", destinations=destinations,
                                     delivery_backoff_s=0.2, delivery_max_attempts=2,
                                     dimse_ae_title="FLAIRCAD-TEST")
        server = Flaircad(settings, free_port()).start()
        started.append(server)
        analysis = _analyse(server, phantom_series(label="cSVD", seed=82, slices=SLICES))

        def settled() -> dict[str, dict[str, Any]] | None:
            deliveries = _deliveries(server, analysis["analysis_id"])
            states = {name: d["state"] for name, d in deliveries.items()}
            return deliveries if states == {"archive": "sent", "nobody": "failed",
                                             "refuses": "failed"} else None

        deliveries = wait_until(settled, 45, "every delivery to settle")
    assert deliveries["archive"]["attempts"] == 1
    assert deliveries["archive"]["instances"] == SLICES + 2  # SCs, map, SR
    assert {calling for calling, _ in store_receiver.received} == {"FLAIRCAD-TEST"}
    assert sorted(str(ds.SOPClassUID) for _, ds in store_receiver.received) == sorted(
        [SC_STORAGE] * SLICES + [PARAMETRIC_MAP_STORAGE, COMPREHENSIVE_SR])
    assert deliveries["nobody"]["attempts"] == 2
    assert "association" in deliveries["nobody"]["last_error"]
    assert deliveries["refuses"]["attempts"] == 2
    assert deliveries["refuses"]["last_error"].startswith("HTTP 409")
    assert len(refusing.requests) == 2
    samples = _metrics(server)
    for name, kind in (("nobody", "cstore"), ("refuses", "stow")):
        assert value(samples, "flaircad_result_deliveries_total", destination=name, kind=kind,
                     outcome="retry") == 1
        assert value(samples, "flaircad_result_deliveries_total", destination=name, kind=kind,
                     outcome="failed") == 1
        assert value(samples, "flaircad_result_delivery_states", destination=name,
                     state="failed") == 1


def test_results_routed_back_by_mistake_stop_after_one_bounce(
        tmp_path: Path, phantom_series: PhantomFactory, started: list[Flaircad]) -> None:
    """A PACS that (wrongly) routes flaircad's results back: the SR is refused, the SC series
    and the Parametric Map are rejected (not_mr), and nothing new is sent."""
    with StowReceiver() as receiver:
        destination = Destination(name="pacs-loop", kind="stow", url=receiver.url)
        settings = flaircad_settings(tmp_path / "spool", destinations=[destination],
                                     stability_window_s=0.5)
        server = Flaircad(settings, free_port()).start()
        started.append(server)
        analysis = _analyse(server, phantom_series(label="MS", seed=85, slices=SLICES))
        wait_until(lambda: receiver.requests, 30, "the result delivery")
        (request,) = receiver.requests
        parts = []
        for ds in request["datasets"]:
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            parts.append(buffer.getvalue())
        boundary = "bounce"
        body = b"".join(b"--bounce\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                        for p in parts) + b"--bounce--\r\n"
        response = httpx.post(server.url + "/dicomweb/studies", content=body, timeout=60,
                              headers={**auth_headers(), "Content-Type": 'multipart/related; '
                                       f'type="application/dicom"; boundary={boundary}'})
        assert response.status_code == 202  # the SC instances stored, the SR refused
        (refused,) = response.json()["00081198"]["Value"]
        assert refused["00081197"]["Value"] == [0x0122]

        study = analysis["study_instance_uid"]
        # the SC series and the Parametric Map (Modality OT both) come back as two series
        analyses = wait_until(lambda: len(server.analyses(study)) == 3
                              and server.wait_for_study(study), 60, "the bounced series")
        bounced = [a for a in analyses if a["analysis_id"] != analysis["analysis_id"]]
        assert sorted(a["series_instance_uid"] for a in bounced) == sorted([
            analysis["outputs"]["secondary_capture_series_instance_uid"],
            analysis["outputs"]["parametric_map_series_instance_uid"]])
        for again in bounced:
            assert again["status"] == "rejected" and again["problem"]["code"] == "not_mr"
            assert server.analysis(again["analysis_id"]).get("deliveries") is None
        time.sleep(1.0)
        assert len(receiver.requests) == 1  # nothing else was sent


def test_no_destinations_no_deliveries(tmp_path: Path, phantom_series: PhantomFactory,
                                       started: list[Flaircad]) -> None:
    server = Flaircad(flaircad_settings(tmp_path / "spool"), free_port()).start()
    started.append(server)
    analysis = _analyse(server, phantom_series(label="MS", seed=83, slices=SLICES))
    assert server.analysis(analysis["analysis_id"]).get("deliveries") is None


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    store = DeliveryStore(tmp_path / "db.sqlite")
    forwarder = Forwarder([], store, lambda _: tmp_path, "me", lambda _: False,
                          calling_ae_title="FLAIRCAD", max_attempts=5, backoff_s=2.0,
                          backoff_max_s=10.0)
    for attempts, base in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)):
        delay = forwarder.backoff(attempts)
        assert base <= delay <= base * 1.1
    store.close()


def test_a_send_claimed_by_a_dead_process_goes_back_to_pending(tmp_path: Path) -> None:
    store = DeliveryStore(tmp_path / "db.sqlite")
    destination = Destination(name="pacs", kind="stow", url="http://127.0.0.1:9/dicom-web")
    assert store.plan("a" * 32, [destination]) == 1
    assert store.plan("a" * 32, [destination]) == 0  # planned once
    (claimed,) = store.claim_due(["pacs"], "dead-owner")
    assert claimed.state is DeliveryState.SENDING
    assert store.claim_due(["pacs"], "someone-else") == []  # claimed once
    assert store.release(lambda owner: owner != "dead-owner") == 1
    (row,) = store.of_analysis("a" * 32)
    assert row.state is DeliveryState.PENDING and row.owner is None
    store.close()


def test_destination_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs url"):
        Destination(name="x", kind="stow")
    with pytest.raises(ValueError, match="needs ae_title"):
        Destination(name="x", kind="cstore", host="pacs", port=104)
    with pytest.raises(ValueError):
        Destination(name="bad name!", kind="stow", url="http://pacs/dicom-web")
    secret = Destination(name="x", kind="stow", url="http://user:pw@pacs/dicom-web",
                         username="u", password="hunter2", headers={"Authorization": "B t"})
    assert "hunter2" not in repr(secret) and "B t" not in repr(secret)
    assert "pw" not in secret.describe()


# -- the DIMSE listener, with a pynetdicom client -----------------------------------------------
def test_dimse_listener_stores_mr_feeds_the_window_and_checks_ae_titles(
        tmp_path: Path, phantom_series: PhantomFactory, started: list[Flaircad]) -> None:
    from pynetdicom import AE

    port = free_port()
    settings = flaircad_settings(tmp_path / "spool", dimse_port=port,
                                 dimse_allowed_calling_aes=["MODALITY"])
    server = Flaircad(settings, free_port()).start()
    started.append(server)
    folder = phantom_series(label="MS", seed=84, slices=SLICES)
    datasets = [pydicom.dcmread(p) for p in _files(folder)]
    before = _metrics(server)  # counters are per process: this test counts the difference

    def associate(calling: str, called: str = "FLAIRCAD") -> Any:
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.add_requested_context(str(datasets[0].SOPClassUID),
                                 str(datasets[0].file_meta.TransferSyntaxUID))
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT: not accepted
        return ae.associate("127.0.0.1", port, ae_title=called)

    assert associate("INTRUDER").is_rejected
    assert associate("MODALITY", called="SOMEONE-ELSE").is_rejected
    association = associate("MODALITY")
    assert association.is_established
    try:
        accepted = {cx.abstract_syntax for cx in association.accepted_contexts}
        assert "1.2.840.10008.5.1.4.1.1.2" not in accepted
        assert association.send_c_echo().Status == 0
        statuses = [association.send_c_store(ds).Status for ds in datasets]
        assert statuses == [0] * SLICES
        assert association.send_c_store(datasets[0]).Status == 0  # the same again: fine
        changed = pydicom.dcmread(_files(folder)[1])
        changed.PatientComments = "different bytes, same SOP Instance UID"
        assert association.send_c_store(changed).Status == 0x0111
    finally:
        association.release()
    (analysis,) = server.wait_for_study(str(datasets[0].StudyInstanceUID))
    assert analysis["status"] == "done"
    assert len(analysis["slice_weights"]) == SLICES
    after = _metrics(server)

    def grew(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert grew("flaircad_instances_received_total", source="dimse") == SLICES + 2
    assert grew("flaircad_dimse_associations_total", outcome="rejected") == 2
    assert grew("flaircad_dimse_associations_total", outcome="accepted") == 1
    (record,) = [r for r in audit.trail(settings).read() if r["event"] == "dimse"]
    assert record["who"] == "ae:MODALITY" and record["client"] == "127.0.0.1"
    assert record["stored"] == SLICES + 1  # the identical re-send is acknowledged
    assert record["series"] == [{"study_instance_uid": str(datasets[0].StudyInstanceUID),
                                 "series_instance_uid": str(datasets[0].SeriesInstanceUID),
                                 "new_instances": SLICES}]
    assert len(record["conflicts"]) == 1 and sum(record["refused"].values()) == 1
