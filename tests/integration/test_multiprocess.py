"""``flaircad serve --workers 2``: one series whose STOW-RS requests reach both processes is
analysed exactly once, and ``/metrics`` adds up both processes whichever one answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest

from service.pipeline.analysis import STAGES
from tests._server import ServerProcess, parse_samples, related, total, value, wait_for_study
from tests.conftest import PhantomFactory, require

pytestmark = pytest.mark.slow

WINDOW_S = 2.0


def _pids(server: ServerProcess, event: str, **fields: object) -> set[int]:
    return {r["pid"] for r in server.log_records()
            if r["event"] == event and all(r.get(k) == v for k, v in fields.items())}


def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


def test_two_processes_analyse_a_split_series_once_and_merge_metrics(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    files = sorted(phantom_series(label="MS", seed=61).glob("*.dcm"))
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    metrics_dir = tmp_path / "prometheus"
    server = ServerProcess(tmp_path / "server", args=("--workers", "2"), env={
        "FLAIRCAD_STABILITY_WINDOW_S": str(WINDOW_S), "FLAIRCAD_LOG_LEVEL": "debug",
        "FLAIRCAD_PROVIDERS": '["CPUExecutionProvider"]',
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}).start()
    try:
        _until(lambda: len(_pids(server, "ready")) == 2, 120, "both workers ready")
        workers = _pids(server, "ready")

        # Two instances per request, sent in parallel bursts on fresh connections, until
        # STOW-RS requests of this series have reached both processes.
        chunks = [files[i:i + 2] for i in range(0, len(files), 2)]

        def stow(chunk: list[Path]) -> int:
            body, headers = related([p.read_bytes() for p in chunk])
            response = httpx.post(f"{server.url}/dicomweb/studies/{study}", content=body,
                                  headers=headers, timeout=60)
            assert response.status_code == 200, response.text
            return len(chunk)

        sent = 0
        with ThreadPoolExecutor(max_workers=6) as pool:
            for _ in range(10):
                sent += sum(pool.map(stow, chunks))
                if _pids(server, "stow") == workers:
                    break
        assert _pids(server, "stow") == workers, "every STOW-RS request reached one process"

        (analysis,) = wait_for_study(server.url, study)
        assert analysis["status"] == "done"
        assert len(analysis["slice_weights"]) == len(files)  # the whole series, not a part
        time.sleep(WINDOW_S + 1.5)  # the other process's window has closed too by now
        assert len(wait_for_study(server.url, study)) == 1
        records = server.log_records()
        assert sum(r["event"] == "series complete" for r in records) == 1

        # Scrape until both processes have answered; every answer has the merged totals.
        answers: dict[int, str] = {}

        def scrape_once(_: int) -> None:
            httpx.get(server.url + "/metrics", timeout=30)

        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(20):
                list(pool.map(scrape_once, range(8)))
                if _pids(server, "request", route="/metrics") == workers:
                    break
        assert _pids(server, "request", route="/metrics") == workers
        for _ in range(8):
            text = httpx.get(server.url + "/metrics", timeout=30).text
            samples = parse_samples(text)
            assert value(samples, "flaircad_instances_received_total", source="stow") == sent
            assert value(samples, "flaircad_series_analysed_total", outcome="ok") == 1
            assert total(samples, "flaircad_predictions_total") == 1
            for stage in STAGES:
                assert value(samples, "flaircad_stage_duration_seconds_count",
                             stage=stage) == 1
            stow_requests = total(samples, "flaircad_http_request_duration_seconds_count",
                                  route="/dicomweb/studies/{study}")
            assert stow_requests == sent / 2
            info = [v for (name, _), v in samples.items() if name == "flaircad_model_info"]
            assert info == [1.0]  # one series, merged (livemax), no pid label
            assert value(samples, "flaircad_queue_depth") == 0
            assert value(samples, "flaircad_inferences_in_flight") == 0
            answers[len(answers)] = text

        promtool = shutil.which("promtool")
        require(promtool, "promtool is not on PATH (apt-get install prometheus)")
        assert promtool is not None
        checked = subprocess.run([promtool, "check", "metrics"], input=answers[0],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and not (checked.stdout + checked.stderr), (
            checked.stdout + checked.stderr)

        status = server.stop(timeout=120)
    finally:
        server.kill()
    assert status == 0, server.log_lines()[-20:]
    # every worker said it was gone: no live gauge files of theirs are left
    assert not [p.name for p in metrics_dir.glob("gauge_live*.db")
                if any(str(pid) in p.name for pid in workers)]
    for line in server.log_lines():
        json.loads(line)
