"""The parts of operations that need no server: the series claim and leases that make several
processes safe, the scrape-time collectors (spool, GPU through a stand-in NVML), the JSON log
formatter's PHI policy, request ids, readiness checks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.core.config import Settings
from service.runtime import logs, metrics
from service.runtime.app import create_app
from service.runtime.scheduler import Scheduler
from service.storage.spool import SeriesKey, Spool
from service.storage.store import AnalysisStore, Status
from tests._server import free_port, parse_samples, value
from tests.conftest import require

SERIES = ("1.2.3.4", "1.2.3.4.5")


# -- several processes: claims, take-overs, leases ---------------------------------------------
def test_a_series_is_claimed_once_however_many_try_at_the_same_moment(tmp_path: Path) -> None:
    stores = [AnalysisStore(tmp_path / "db.sqlite") for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    won: list[Any] = []

    def claim(store: AnalysisStore, index: int) -> None:
        barrier.wait()
        won.append(store.claim_series(*SERIES, "fingerprint", f"owner-{index}"))

    threads = [threading.Thread(target=claim, args=(s, i)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [record for record in won if record is not None]
    assert len(won) == 8 and len(winners) == 1
    assert winners[0].source == "stow" and winners[0].owner.startswith("owner-")
    # other content of the same series, or a retry after a failure, may be claimed again
    assert stores[0].claim_series(*SERIES, "other-fingerprint", "owner-x") is not None
    stores[0].update(winners[0].id, Status.FAILED, problem={"code": "x", "detail": "y"})
    assert stores[1].claim_series(*SERIES, "fingerprint", "owner-y") is not None
    for store in stores:
        store.close()


def test_take_over_is_compare_and_set(tmp_path: Path) -> None:
    store = AnalysisStore(tmp_path / "db.sqlite")
    record = store.create("upload", owner="dead")
    assert store.take_over(record.id, "dead", "first")
    assert not store.take_over(record.id, "dead", "second")
    assert store.get(record.id).owner == "first"  # type: ignore[union-attr]
    store.close()


def test_an_old_database_gains_the_owner_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE analyses (id TEXT PRIMARY KEY, status TEXT NOT NULL, source TEXT "
                   "NOT NULL, study_instance_uid TEXT, series_instance_uid TEXT, fingerprint "
                   "TEXT, created REAL NOT NULL, updated REAL NOT NULL, result TEXT, problem "
                   "TEXT)")
        db.execute("INSERT INTO analyses VALUES ('a', 'queued', 'upload', NULL, NULL, NULL, 1, 1,"
                   " NULL, NULL)")
    store = AnalysisStore(path)
    (record,) = store.unfinished()
    assert record.id == "a" and record.owner is None
    store.close()


_HOLD_LEASE = """
import sys
from pathlib import Path
from service.storage.spool import Spool
lease = Spool(Path(sys.argv[1])).acquire_lease()
print(lease.token, flush=True)
sys.stdin.read()
"""


def test_a_lease_is_held_while_its_process_lives(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None
        token = holder.stdout.readline().strip()
        assert token and spool.owner_alive(token)
        assert spool.owner_alive(token)  # checking does not take it
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not spool.owner_alive(token)
    assert not (spool.owners / f"{token}.lock").exists()
    assert not spool.owner_alive(None) and not spool.owner_alive("../etc")
    mine = spool.acquire_lease()
    assert spool.owner_alive(mine.token)
    mine.release()
    assert not spool.owner_alive(mine.token)


class _Engine:
    provider = "CPUExecutionProvider"


def test_only_analyses_of_dead_owners_are_taken_over(tmp_path: Path) -> None:
    settings = Settings(spool_dir=tmp_path, stability_window_s=0.2)
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / "flaircad.sqlite")
    alive = spool.acquire_lease()  # another live process
    orphan = store.create("upload", owner="host-1-gone")
    kept = store.create("upload", owner=alive.token)
    for record in (orphan, kept):
        (spool.upload_folder(record.id) / "00000.dcm").write_bytes(b"x")
    ran: list[list[Path]] = []

    def analyse(files: list[Path], *args: Any, **kwargs: Any) -> Any:
        ran.append(files)
        raise RuntimeError("stand-in")

    async def run() -> None:
        scheduler = Scheduler(settings, _Engine(), spool, store, analyse=analyse)  # type: ignore[arg-type]
        await scheduler.start()
        deadline = time.monotonic() + 10
        while store.get(orphan.id).status not in (Status.FAILED,):  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await scheduler.stop()

    asyncio.run(run())
    assert [files[0].parent.name for files in ran] == [orphan.id]
    assert store.get(kept.id).status is Status.QUEUED  # type: ignore[union-attr]
    assert store.get(kept.id).owner == alive.token  # type: ignore[union-attr]
    alive.release()
    store.close()


def test_a_series_is_complete_only_when_its_folder_is_quiet(tmp_path: Path) -> None:
    """Another process may still be writing instances: the folder's mtime says so."""
    settings = Settings(spool_dir=tmp_path, stability_window_s=0.5)
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / "flaircad.sqlite")
    key = SeriesKey(*SERIES)
    folder = spool.instance_path(key, "1.2.3.4.5.6").parent
    folder.mkdir(parents=True)
    (folder / "1.2.3.4.5.6.dcm").write_bytes(b"x")

    async def run() -> list[str]:
        scheduler = Scheduler(settings, _Engine(), spool, store,  # type: ignore[arg-type]
                              analyse=lambda *a, **k: (_ for _ in ()).throw(RuntimeError()))
        await scheduler.start()
        scheduler._arriving[key] = time.monotonic() - 60  # this process saw nothing for long
        seen = []
        for _ in range(12):  # 1.2 s of "another process" writing every 0.1 s
            os.utime(folder)
            await asyncio.sleep(0.1)
            seen.append(len(store.recent()))
        await asyncio.sleep(1.2)
        seen.append(len(store.recent()))
        await scheduler.stop(grace_s=5)
        return [str(n) for n in seen]

    counts = asyncio.run(run())
    assert set(counts[:-1]) == {"0"} and counts[-1] == "1", counts
    store.close()


# -- collectors ---------------------------------------------------------------------------------
def test_spool_bytes_by_area_with_a_bounded_walk(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.incoming / "a.dcm").write_bytes(b"x" * 1000)
    (spool.results / "r").mkdir()
    (spool.results / "r" / "sr.dcm").write_bytes(b"x" * 10)
    (tmp_path / "flaircad.sqlite").write_bytes(b"x" * 7)
    collector = metrics.SpoolCollector(tmp_path, min_interval_s=3600)
    samples = parse_samples(metrics.exposition([collector]).decode())
    assert value(samples, "flaircad_spool_bytes", area="incoming") == 1000
    assert value(samples, "flaircad_spool_bytes", area="results") == 10
    assert value(samples, "flaircad_spool_bytes", area="database") == 7
    assert value(samples, "flaircad_spool_free_bytes") > 0
    (spool.incoming / "b.dcm").write_bytes(b"x" * 5)
    again = parse_samples(metrics.exposition([collector]).decode())
    assert value(again, "flaircad_spool_bytes", area="incoming") == 1000  # cached
    collector.min_interval_s = 0
    fresh = parse_samples(metrics.exposition([collector]).decode())
    assert value(fresh, "flaircad_spool_bytes", area="incoming") == 1005


class _NVMLError(Exception):
    pass


def _fake_nvml(fail_queries: bool = False) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    handles = {0: "h0", 1: "h1"}
    nvml.NVMLError = _NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handles.__getitem__  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByUUID = {"GPU-b": "h1"}.__getitem__  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetIndex = {"h0": 0, "h1": 1}.__getitem__  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = {"h0": "GPU-a", "h1": b"GPU-b"}.__getitem__  # type: ignore[attr-defined]

    def memory(handle: str) -> Any:
        if fail_queries:
            raise _NVMLError("GPU is lost")
        return types.SimpleNamespace(used=3 * 1024**3, total=80 * 1024**3, free=0)

    nvml.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=42, memory=7)
    return nvml


def test_gpu_metrics_come_from_nvml_when_cuda_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert metrics.GpuCollector.create("CPUExecutionProvider") is None
    collector = metrics.GpuCollector.create("CUDAExecutionProvider", 0)
    assert collector is not None
    text = metrics.exposition([collector]).decode()
    samples = parse_samples(text)
    labels = {"gpu": "0", "uuid": "GPU-a"}
    assert value(samples, "flaircad_gpu_memory_used_bytes", **labels) == 3 * 1024**3
    assert value(samples, "flaircad_gpu_memory_total_bytes", **labels) == 80 * 1024**3
    assert value(samples, "flaircad_gpu_utilization_ratio", **labels) == pytest.approx(0.42)
    promtool = shutil.which("promtool")
    require(promtool, "promtool is not on PATH (apt-get install prometheus)")
    assert promtool is not None
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr), checked.stdout

    # CUDA device 0 is the host's GPU named first in CUDA_VISIBLE_DEVICES (index or UUID)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b")
    visible = metrics.GpuCollector.create("CUDAExecutionProvider", 0)
    assert visible is not None
    samples = parse_samples(metrics.exposition([visible]).decode())
    assert value(samples, "flaircad_gpu_memory_used_bytes", gpu="1", uuid="GPU-b") > 0


def test_gpu_metrics_are_absent_not_broken_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert metrics.GpuCollector.create("CUDAExecutionProvider") is None
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_queries=True))
    collector = metrics.GpuCollector.create("CUDAExecutionProvider")
    assert collector is not None
    text = metrics.exposition([collector]).decode()  # the query fails: no GPU samples, no 500
    assert "flaircad_gpu_" not in text and "flaircad_queue_depth" in text


def test_dead_processes_lose_their_live_gauges(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    for name in (f"gauge_livesum_{dead_pid}.db", f"gauge_livesum_{os.getpid()}.db",
                 f"counter_{dead_pid}.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    assert metrics.forget_dead_processes() == [dead_pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"gauge_livesum_{os.getpid()}.db", f"counter_{dead_pid}.db"])  # counters stay


# -- logs ---------------------------------------------------------------------------------------
def _format(record: logging.LogRecord) -> dict[str, Any]:
    return json.loads(logs.JsonFormatter().format(record))


def test_our_records_become_json_with_context_and_extras() -> None:
    record = logging.LogRecord("service.runtime.scheduler", logging.INFO, __file__, 1,
                               "analysis %s", ("finished",), None)
    record.outcome = "ok"
    record.timings_ms = {"total": 1.5}
    request, analysis = logs.REQUEST_ID.set("req-12345678"), logs.ANALYSIS_ID.set("a" * 32)
    try:
        line = _format(record)
    finally:
        logs.REQUEST_ID.reset(request)
        logs.ANALYSIS_ID.reset(analysis)
    assert line["event"] == "analysis finished" and line["level"] == "info"
    assert line["logger"] == "service.runtime.scheduler" and line["pid"] == os.getpid()
    assert line["request_id"] == "req-12345678" and line["analysis_id"] == "a" * 32
    assert line["outcome"] == "ok" and line["timings_ms"] == {"total": 1.5}


def test_third_party_messages_and_exception_texts_are_withheld() -> None:
    value_text = "Invalid value for VR DA: '1971-02-03'"
    pydicom_record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, value_text,
                                       None, None)
    pydicom_record.patient = "Doe^Jane"  # extras of other libraries are dropped too
    line = _format(pydicom_record)
    assert line["event"] == logs.WITHHELD and line["logger"] == "pydicom"
    assert "1971" not in json.dumps(line) and "Doe" not in json.dumps(line)

    try:
        raise ValueError("PatientName 'Doe^Jane' is not valid")
    except ValueError:
        failing = logging.LogRecord("service.runtime.scheduler", logging.ERROR, __file__, 1,
                                    "analysis failed", None, sys.exc_info())
    line = _format(failing)
    assert line["exception"]["type"] == "ValueError"
    assert any("test_third_party_messages" in frame for frame in line["exception"]["frames"])
    assert "Doe" not in json.dumps(line)


def test_python_warnings_are_logged_withheld(capsys: pytest.CaptureFixture[str]) -> None:
    logging.captureWarnings(False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter())  # turns warning capture on
    logger = logging.getLogger("py.warnings")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Invalid value for VR PN: 'Doe^Jane'", UserWarning, stacklevel=1)
    finally:
        logger.removeHandler(handler)
        logging.captureWarnings(False)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["logger"] == "py.warnings" and line["event"] == logs.WITHHELD


@pytest.mark.parametrize(("incoming", "kept"), [
    ("ops-test-stow-0001", True), ("0f" * 16, True), ("short", False),
    ("has space in it", False), ("x" * 129, False), ("Doe^Jane^1971", False), (None, False)])
def test_incoming_request_ids_are_kept_only_when_they_look_like_ids(incoming: str | None,
                                                                    kept: bool) -> None:
    assert (logs.sane_request_id(incoming) is not None) is kept


# -- readiness ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread (no signals there); yields its URL once ready."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while getattr(app.state, "runtime", None) is None or not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_readiness_reports_each_check(tmp_path: Path) -> None:
    app = create_app(Settings(spool_dir=tmp_path, providers=["CPUExecutionProvider"],
                              auth_disabled=True))
    with _in_thread(app) as url:
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        checks = ready.json()["checks"]
        assert checks["model"]["warmed"] is True and checks["spool"] == {"ok": True}
        assert checks["queue"]["ok"] is True and checks["draining"] == {"ok": True}
        assert re.match(r"^[0-9a-f]{32}$", ready.headers["x-request-id"])
        rt = app.state.runtime

        def full_disk() -> None:
            raise OSError(errno.ENOSPC, "No space left on device: /secret/path")

        rt.spool.probe_writable = full_disk
        unready = httpx.get(url + "/readyz")
        assert unready.status_code == 503 and unready.json()["status"] == "unready"
        assert unready.json()["checks"]["spool"] == {"ok": False, "error": "ENOSPC"}
        del rt.spool.probe_writable

        rt.scheduler.begin_drain()
        draining = httpx.get(url + "/readyz")
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        assert httpx.get(url + "/healthz").status_code == 200


def test_an_unhandled_error_is_a_counted_500_logged_under_its_request(tmp_path: Path) -> None:
    app = create_app(Settings(spool_dir=tmp_path, providers=["CPUExecutionProvider"],
                              auth_disabled=True))

    def boom(item: str) -> None:
        raise RuntimeError(f"value {item} must not be logged")

    app.add_api_route("/boom/{item}", boom)
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(logs.JsonFormatter().format(record)))

    handler = Collect()
    logging.getLogger("service").addHandler(handler)
    try:
        with _in_thread(app) as url:
            response = httpx.get(url + "/boom/Doe-Jane", headers={"X-Request-ID": "boom-0001"})
            samples = parse_samples(httpx.get(url + "/metrics").text)
    finally:
        logging.getLogger("service").removeHandler(handler)
        logging.captureWarnings(False)
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    assert value(samples, "flaircad_http_request_duration_seconds_count", route="/boom/{item}",
                 method="GET", status="500") == 1
    (error,) = [line for line in lines if line["event"] == "unhandled error"]
    assert error["request_id"] == "boom-0001" and error["route"] == "/boom/{item}"
    assert error["exception"]["type"] == "RuntimeError"
    assert "Doe" not in json.dumps(lines)
