"""SIGTERM on a real ``flaircad serve``: readiness says 503 ``draining``, new work gets 503 +
Retry-After, accepted analyses finish within the grace period, then the process exits; what
the grace period cut off resumes on the next start."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests._server import ServerProcess, related
from tests.conftest import PhantomFactory

pytestmark = pytest.mark.slow


def _statuses(spool: Path) -> dict[str, str]:
    with sqlite3.connect(spool / "flaircad.sqlite") as db:
        return dict(db.execute("SELECT id, status FROM analyses").fetchall())


def _queue(server: ServerProcess, body: bytes, headers: dict[str, str], n: int) -> list[str]:
    ids = []
    for _ in range(n):
        # no-cache: the same series again is a new analysis, not the earlier one (issue 6)
        response = httpx.post(server.url + "/v1/analyses", content=body, timeout=60,
                              headers={**headers, "Prefer": "respond-async",
                                       "Cache-Control": "no-cache"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["analysis_id"])
    return ids


def test_sigterm_drains_then_exits(tmp_path: Path, phantom_series: PhantomFactory) -> None:
    files = sorted(phantom_series(label="MS", seed=51).glob("*.dcm"))
    body, headers = related([p.read_bytes() for p in files])
    server = ServerProcess(tmp_path / "server", env={
        "FLAIRCAD_SHUTDOWN_GRACE_S": "120", "FLAIRCAD_RETRY_AFTER_S": "9",
        "FLAIRCAD_PROVIDERS": '["CPUExecutionProvider"]'}).start()
    try:
        accepted = _queue(server, body, headers, 4)
        server.signal()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready = httpx.get(server.url + "/readyz", timeout=5)
            if ready.status_code == 503:
                break
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
        assert ready.json()["checks"]["draining"]["ok"] is False

        # the process is alive and answers; new work is refused with a reason and a retry time
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        refused = httpx.post(server.url + "/v1/analyses", content=body, headers=headers,
                             timeout=30)
        assert refused.status_code == 503
        assert refused.json()["code"] == "draining"
        assert refused.headers["retry-after"] == "9"
        stow = httpx.post(server.url + "/dicomweb/studies", content=body, headers=headers,
                          timeout=30)
        assert stow.status_code == 503 and stow.json()["code"] == "draining"
        # results stay readable while draining
        assert httpx.get(f"{server.url}/v1/analyses/{accepted[0]}",
                         timeout=5).status_code == 200
        still_running = [a for a, s in _statuses(server.folder / "spool").items()
                         if s in ("queued", "running")]
        assert still_running, "the analyses finished before the drain could be observed"

        status = server.wait(timeout=180)
    finally:
        server.kill()
    assert status in (0, -15), status
    assert _statuses(server.folder / "spool") == dict.fromkeys(accepted, "done")
    events = [json.loads(line)["event"] for line in server.log_lines()]
    assert events.index("SIGTERM: draining") < events.index(
        "drained: every accepted analysis has finished") < events.index("Shutting down")
    assert events.count("analysis finished") == 4


def test_the_grace_period_bounds_the_drain_and_a_restart_resumes(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    files = sorted(phantom_series(label="cSVD", seed=52).glob("*.dcm"))
    body, headers = related([p.read_bytes() for p in files])
    env = {"FLAIRCAD_SHUTDOWN_GRACE_S": "0.2", "FLAIRCAD_PROVIDERS": '["CPUExecutionProvider"]'}
    server = ServerProcess(tmp_path / "server", env=env).start()
    try:
        accepted = _queue(server, body, headers, 5)
        started = time.monotonic()
        server.signal()
        status = server.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        server.kill()
    tail = "\n".join(server.log_lines()[-15:])
    assert status in (0, -15), f"exit status {status}:\n{tail}"
    statuses = _statuses(server.folder / "spool")
    left = [a for a in accepted if statuses[a] != "done"]
    assert left, f"all 5 analyses finished in {took:.1f} s: the grace period did not bound it"
    records = [json.loads(line) for line in server.log_lines()]
    assert any(r["event"].startswith("grace period over") for r in records), tail

    again = ServerProcess(tmp_path / "server", env=env).start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(httpx.get(f"{again.url}/v1/analyses/{a}").json()["status"] == "done"
                   for a in accepted):
                break
            time.sleep(0.3)
    finally:
        again.stop()
    assert set(_statuses(server.folder / "spool").values()) == {"done"}


def test_a_second_sigterm_ends_the_grace_period(tmp_path: Path,
                                                phantom_series: PhantomFactory) -> None:
    files = sorted(phantom_series(label="cSVD", seed=52).glob("*.dcm"))
    body, headers = related([p.read_bytes() for p in files])
    server = ServerProcess(tmp_path / "server", env={
        "FLAIRCAD_SHUTDOWN_GRACE_S": "600",
        "FLAIRCAD_PROVIDERS": '["CPUExecutionProvider"]'}).start()
    try:
        accepted = _queue(server, body, headers, 6)
        server.signal()
        time.sleep(0.3)
        server.signal()
        status = server.wait(timeout=60)
    finally:
        server.kill()
    assert status in (0, -15), status
    statuses = _statuses(server.folder / "spool")
    assert any(statuses[a] != "done" for a in accepted), statuses
