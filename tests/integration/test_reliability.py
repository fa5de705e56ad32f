"""Nothing lost, nothing done twice: SIGKILL mid-work and restart, idempotent re-sends,
conflicting re-sends, retention, the disk watermark, concurrent stores, staged results."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from service.core.config import Settings
from service.intake.multipart import MediaType, parse_multipart
from service.runtime import retention
from service.runtime.audit import AuditLog
from service.storage.deliveries import DeliveryStore
from service.storage.spool import SeriesKey, Spool, StoreOutcome
from service.storage.store import AnalysisStore, Status
from tests._live import KEY, Live, related, running, settings_for
from tests._server import ServerProcess
from tests.conftest import PhantomFactory

AUTH = {"Authorization": f"Bearer {KEY}"}


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _outputs(url: str, analysis_id: str) -> list[pydicom.Dataset]:
    fetched = httpx.get(f"{url}/v1/analyses/{analysis_id}/instances", headers=AUTH, timeout=60)
    assert fetched.status_code == 200
    media = MediaType.parse(fetched.headers["content-type"])
    return [pydicom.dcmread(io.BytesIO(part.body))
            for part in parse_multipart(fetched.content, media.params["boundary"])]


# -- kill -9 and restart --------------------------------------------------------------------
def _statuses(url: str) -> dict[str, str]:
    analyses = httpx.get(url + "/v1/analyses", headers=AUTH, timeout=10).json()["analyses"]
    return {a["analysis_id"]: a["status"] for a in analyses}


def test_sigkill_mid_work_then_restart_analyses_every_series_exactly_once(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    series = [_files(phantom_series(label=label, seed=seed))
              for label, seed in (("MS", 71), ("cSVD", 72), ("MS", 73), ("cSVD", 74),
                                  ("MS", 75), ("cSVD", 76))]
    env = {"FLAIRCAD_AUTH_DISABLED": "false", "FLAIRCAD_API_KEYS": f"tester:{KEY}",
           "FLAIRCAD_STABILITY_WINDOW_S": "0.5", "FLAIRCAD_WORKERS": "1",
           "FLAIRCAD_PROVIDERS": '["CPUExecutionProvider"]'}
    folder = tmp_path / "server"
    server = ServerProcess(folder, env=env).start()
    try:
        for files in series[:5]:
            body, headers = related([p.read_bytes() for p in files])
            stored = httpx.post(server.url + "/dicomweb/studies", content=body, timeout=60,
                                headers={**headers, **AUTH})
            assert stored.status_code == 200, stored.text
        # kill as soon as the first one is done: the others are queued or running
        deadline = time.monotonic() + 120
        while True:
            statuses = _statuses(server.url)
            if "done" in statuses.values():
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.05)
        # and one series that is stored, in its stability window, not yet analysed
        body, headers = related([p.read_bytes() for p in series[5]])
        assert httpx.post(server.url + "/dicomweb/studies", content=body, timeout=60,
                          headers={**headers, **AUTH}).status_code == 200
        at_kill = _statuses(server.url)
        server.signal(signal.SIGKILL)
        assert server.wait(timeout=30) == -signal.SIGKILL
    finally:
        server.kill()
    unfinished = [s for s in at_kill.values() if s in ("queued", "running")]
    assert unfinished, f"everything finished before the kill: {at_kill}"

    again = ServerProcess(folder, env=env).start()  # same spool, same database
    try:
        for files in series:
            study, series_uid = _uids(files[0])
            deadline = time.monotonic() + 240
            while True:
                analyses = httpx.get(again.url + "/v1/analyses", headers=AUTH, timeout=10,
                                     params={"study_instance_uid": study}).json()["analyses"]
                if analyses and all(a["status"] == "done" for a in analyses):
                    break
                assert time.monotonic() < deadline, analyses
                time.sleep(0.2)
            assert len(analyses) == 1, analyses  # exactly once
            (analysis,) = analyses
            assert analysis["series_instance_uid"] == series_uid
            outputs = _outputs(again.url, analysis["analysis_id"])
            sr = [ds for ds in outputs if ds.Modality == "SR"]
            assert len(sr) == 1 and sr[0].SOPInstanceUID == (
                analysis["outputs"]["sr_sop_instance_uid"])
            assert len(outputs) == len(files) + 2  # an SC per slice, the map, the SR
        # the analyses that were done before the kill kept their ids and results
        after = _statuses(again.url)
        assert len(after) == len(series)
        for analysis_id, status in at_kill.items():
            assert analysis_id in after and after[analysis_id] == "done", (status, after)
        time.sleep(1.5)  # nothing else starts later (a second analysis of anything)
        assert len(_statuses(again.url)) == len(series)
    finally:
        again.stop()
    finished = [json.loads(line) for line in (folder / "spool" / "audit.jsonl").read_text()
                .splitlines() if '"event":"analysis"' in line]
    done_ids = {r["analysis_id"] for r in finished if r["status"] == "done"}
    assert done_ids == set(after)


# -- idempotency ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with running(settings_for(tmp_path_factory.mktemp("reliability"))) as server:
        yield server


def test_a_resent_series_points_to_its_analysis_and_result_uids(
        live: Live, phantom_series: PhantomFactory) -> None:
    files = _files(phantom_series(label="MS", seed=81))
    study, _ = _uids(files[0])
    body, headers = related([p.read_bytes() for p in files])
    assert live.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    (first,) = live.wait_for_study(study)
    assert first["status"] == "done"
    again = live.post(f"/dicomweb/studies/{study}", content=body, headers=headers)
    assert again.status_code == 200  # acknowledged, every instance
    assert len(again.json()["00081199"]["Value"]) == len(files)
    time.sleep(live.settings.stability_window_s + 1.0)
    (second,) = live.wait_for_study(study)  # still one analysis, the same result UIDs
    assert second["analysis_id"] == first["analysis_id"]
    assert second["outputs"] == first["outputs"]


def test_a_reuploaded_series_returns_its_analysis_unless_no_cache(
        live: Live, phantom_series: PhantomFactory) -> None:
    files = _files(phantom_series(label="cSVD", seed=82))
    body, headers = related([p.read_bytes() for p in files])
    first = live.post("/v1/analyses", content=body, headers=headers)
    assert first.status_code == 200
    # the same instances in another order, as form-data: the same analysis
    form = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in reversed(files)]
    second = live.post("/v1/analyses", files=form)
    assert second.status_code == 200
    assert second.json()["analysis_id"] == first.json()["analysis_id"]
    assert second.json()["outputs"] == first.json()["outputs"]
    assert second.headers["content-location"] == f"/v1/analyses/{first.json()['analysis_id']}"
    queued = live.post("/v1/analyses", content=body,
                       headers={**headers, "Prefer": "respond-async"})
    assert queued.status_code == 202
    assert queued.headers["location"] == second.headers["content-location"]
    fresh = live.post("/v1/analyses", content=body, headers={**headers,
                                                              "Cache-Control": "no-cache"})
    assert fresh.status_code == 200
    assert fresh.json()["analysis_id"] != first.json()["analysis_id"]
    audit = AuditLog(live.settings.spool_dir / "audit.jsonl").read()
    uploads = [r for r in audit if r["event"] == "upload"
               and r["analysis_id"] == first.json()["analysis_id"]]
    assert [r["reused"] for r in uploads] == [False, True, True]


def test_different_content_under_a_known_uid_is_refused_and_reported(
        live: Live, phantom_series: PhantomFactory, tmp_path: Path) -> None:
    files = _files(phantom_series(label="MS", seed=83))
    study, series_uid = _uids(files[0])
    body, headers = related([p.read_bytes() for p in files])
    assert live.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    changed = pydicom.dcmread(files[3])
    changed.PixelData = bytes(len(changed.PixelData))  # same UID, other pixels
    out = io.BytesIO()
    changed.save_as(out)
    body, headers = related([out.getvalue()])
    refused = live.post(f"/dicomweb/studies/{study}", content=body, headers=headers)
    assert refused.status_code == 409
    assert refused.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]
    (analysis,) = live.wait_for_study(study)
    assert analysis["status"] == "done"
    assert any(w.startswith("conflicting_duplicate: 1 instance") for w in analysis["warnings"])
    # the first copy was kept and analysed
    stored = live.runtime.spool.instance_path(SeriesKey(study, series_uid),
                                              str(changed.SOPInstanceUID))
    assert stored.read_bytes() == files[3].read_bytes()
    audit = AuditLog(live.settings.spool_dir / "audit.jsonl").read()
    conflicts = [r for r in audit if r["event"] == "stow" and r.get("conflicts")]
    assert conflicts[-1]["conflicts"] == [{"series_instance_uid": series_uid,
                                           "sop_instance_uid": str(changed.SOPInstanceUID)}]
    metrics = live.get("/metrics").text
    assert 'flaircad_instances_refused_total{reason="conflicting_duplicate"}' in metrics


# -- retention -----------------------------------------------------------------------------
def test_retention_deletes_results_inputs_and_rows(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    settings = settings_for(tmp_path / "spool", retention_hours=4 / 3600,
                            retention_sweep_interval_s=0.3)
    stowed = _files(phantom_series(label="MS", seed=84))
    uploaded = _files(phantom_series(label="cSVD", seed=85))
    with running(settings) as live:
        body, headers = related([p.read_bytes() for p in stowed])
        assert live.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
        body, headers = related([p.read_bytes() for p in uploaded])
        upload = live.post("/v1/analyses", content=body, headers=headers).json()
        study, series_uid = _uids(stowed[0])
        (stow,) = live.wait_for_study(study, timeout=60)
        spool = live.runtime.spool
        series_folder = spool.series_folder(SeriesKey(study, series_uid))
        ids = [stow["analysis_id"], upload["analysis_id"]]
        for analysis_id in ids:
            assert live.get(f"/v1/analyses/{analysis_id}").status_code == 200
            assert spool.result_folder(analysis_id).is_dir()
        assert series_folder.is_dir()
        deadline = time.monotonic() + 30
        while any(live.get(f"/v1/analyses/{i}").status_code != 404 for i in ids):
            assert time.monotonic() < deadline, "not deleted within 30 s"
            time.sleep(0.2)
        for analysis_id in ids:
            assert not spool.result_folder(analysis_id).exists()
            assert not (spool.uploads / analysis_id).exists()
        assert not series_folder.exists() and not series_folder.parent.exists()
        assert live.get("/v1/analyses", params={"study_instance_uid": study}).json() == {
            "analyses": []}
    with sqlite3.connect(settings.spool_dir / "flaircad.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM analyses").fetchone() == (0,)
    # nothing with the patient's data is left but the audit trail (UIDs, no names)
    left = [p for p in (settings.spool_dir / "incoming").rglob("*") if p.is_file()]
    left += [p for p in (settings.spool_dir / "results").rglob("*") if p.is_file()]
    assert left == []
    audit = AuditLog(settings.spool_dir / "audit.jsonl").read()
    assert {r["analysis_id"] for r in audit if r["event"] == "retention"} == set(ids)


def test_retention_keeps_what_is_still_needed(tmp_path: Path) -> None:
    settings = Settings(spool_dir=tmp_path, retention_hours=1.0, auth_disabled=True)
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / "flaircad.sqlite")
    deliveries = DeliveryStore(tmp_path / "flaircad.sqlite")
    key = SeriesKey("1.2.3", "1.2.3.4")
    spool.store_instance(key, "1.2.3.4.1", b"instance")
    old = time.time() - 7200
    os.utime(spool.series_folder(key), (old, old))
    waiting = store.create("stow", "1.2.3", "1.2.3.4", "f1")  # its result not sent yet
    sent = store.create("upload")
    young = store.create("upload")
    for record in (waiting, sent, young):
        store.update(record.id, Status.DONE, result={"outputs": {}})
        (spool.result_folder(record.id)).mkdir()
    with store._lock:  # backdate two of them
        store._db.execute("UPDATE analyses SET updated=? WHERE id IN (?, ?)",
                          (old, waiting.id, sent.id))
    with deliveries._lock:
        deliveries._db.execute(
            "INSERT INTO deliveries (analysis_id, destination, kind, state, next_attempt, "
            "created, updated) VALUES (?, 'pacs', 'stow', 'pending', 0, 0, 0)", (waiting.id,))
    report = retention.sweep(settings, spool, store)
    assert report.analyses == [sent.id]
    assert store.get(waiting.id) is not None and spool.series_files(key)
    assert store.get(young.id) is not None and spool.result_folder(young.id).is_dir()
    # once delivered, it goes, with its series
    with deliveries._lock:
        deliveries._db.execute("UPDATE deliveries SET state='sent'")
    assert retention.sweep(settings, spool, store).analyses == [waiting.id]
    assert not spool.series_files(key)
    with store._lock:
        assert store._db.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)
    store.close()
    deliveries.close()


# -- disk watermark ---------------------------------------------------------------------------
def test_a_full_spool_volume_refuses_new_data_with_503(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    files = _files(phantom_series(label="MS", seed=81))
    body, headers = related([p.read_bytes() for p in files[:2]])
    with running(settings_for(tmp_path / "spool", retry_after_s=11)) as live:
        # past the watermark once ready (readiness itself says 503 spool_full then)
        live.runtime.settings.spool_max_fill = 1e-6
        assert live.get("/readyz").status_code == 503
        for path in ("/dicomweb/studies", "/v1/analyses"):
            refused = live.post(path, content=body, headers=headers)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "spool_full"
            assert refused.headers["retry-after"] == "11"
        assert not any(live.runtime.spool.incoming.iterdir())
        assert live.get("/v1/model").status_code == 200  # reading still works


# -- the spool under concurrency and crashes -----------------------------------------------------
def test_concurrent_stores_of_one_uid_never_overwrite(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    key = SeriesKey("1.2.3", "1.2.3.4")
    outcomes: list[StoreOutcome] = []
    barrier = threading.Barrier(8)

    def store(data: bytes) -> None:
        barrier.wait()
        outcomes.append(spool.store_instance(key, "1.2.3.4.5", data))

    threads = [threading.Thread(target=store, args=(bytes([n % 2]) * 100_000,))
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(StoreOutcome.STORED) == 1
    stored = spool.instance_path(key, "1.2.3.4.5").read_bytes()
    winner = stored[0]
    assert stored == bytes([winner]) * 100_000  # one whole copy, never a mix
    assert outcomes.count(StoreOutcome.DUPLICATE) == 3  # the same bytes as the winner
    assert outcomes.count(StoreOutcome.CONFLICT) == 4
    assert [p.name for p in spool.series_folder(key).iterdir()] == ["1.2.3.4.5.dcm"]


def test_results_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    staging = spool.staging_folder("a" * 32)
    (staging / "sc").mkdir()
    (staging / "sc" / "IM0001.dcm").write_bytes(b"sc")
    (staging / "sr.dcm").write_bytes(b"sr")
    assert not spool.result_folder("a" * 32).exists()  # not visible while written
    spool.publish_result(staging, "a" * 32)
    assert (spool.result_folder("a" * 32) / "sc" / "IM0001.dcm").read_bytes() == b"sc"
    assert not staging.exists()
    # a second attempt (the first was never marked done) replaces it as a whole
    retry = spool.staging_folder("a" * 32)
    (retry / "sr.dcm").write_bytes(b"sr2")
    spool.publish_result(retry, "a" * 32)
    assert sorted(p.name for p in spool.result_folder("a" * 32).iterdir()) == ["sr.dcm"]
    # what a crash left while writing goes once it is stale
    crashed = spool.staging_folder("b" * 32)
    (crashed / "half.dcm").write_bytes(b"x")
    request = spool.request_folder()
    assert spool.remove_stale(3600) == 0
    old = time.time() - 7200
    for path in (crashed, crashed / "half.dcm", request):
        os.utime(path, (old, old))
    assert spool.remove_stale(3600) == 2
    assert not crashed.exists() and not request.exists()
    assert spool.result_folder("a" * 32).exists()
