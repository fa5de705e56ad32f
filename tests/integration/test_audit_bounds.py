"""Failed logins must not fill the patient-data disk (issue 13, item 2): refusals are counted,
not written one line each; the audit trail is rotated and capped; readiness says when the spool
is past the watermark STOW-RS refuses at."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.runtime import audit
from service.runtime.audit import AuditLog
from service.storage.spool import Spool
from tests._live import KEY, Live, related, running, settings_for
from tests.conftest import PhantomFactory

MAX_BYTES = 16 * 1024
BACKUPS = 2
CAP = (BACKUPS + 1) * MAX_BYTES  # what the audit files may hold together
FLOOD = 20_000


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    spool = tmp_path_factory.mktemp("audit-bounds") / "spool"
    settings = settings_for(spool, audit_max_bytes=MAX_BYTES, audit_backups=BACKUPS,
                            # windows are aligned to the clock: none closes during the tests
                            audit_refusal_window_s=1e9, shutdown_grace_s=10.0)
    with running(settings) as server:
        yield server


def _spool_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _audit_bytes(live: Live) -> int:
    return sum(path.stat().st_size for path in audit.trail(live.settings).files())


def _refusals(records: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Refusals per (reason, client): one per ``auth_failed`` line, ``count`` per summary."""
    out: dict[tuple[str, str], int] = {}
    for record in records:
        if record["event"] in ("auth_failed", "auth_failed_repeated"):
            key = (record["reason"], record["client"])
            out[key] = out.get(key, 0) + record.get("count", 1)
    return out


def _flood(live: Live, count: int, clients: int = 2) -> dict[int, int]:
    """``count`` requests without a valid key straight into the app (in-process, no socket),
    from ``clients`` addresses, half of them with a wrong key; the statuses answered."""
    statuses: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def run() -> None:
        for n in range(count):
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
                sent.append(message)

            headers = [(b"host", b"flaircad")]
            if n % 2:
                headers.append((b"authorization", b"Bearer wrong-key-0123456789abcdef"))
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": "/dicomweb/studies",
                     "raw_path": b"/dicomweb/studies", "query_string": b"", "root_path": "",
                     "headers": headers, "client": (f"198.51.100.{n % clients + 1}", 50000),
                     "server": ("127.0.0.1", 8000)}
            await live.app(scope, receive, send)
            status = int(sent[0]["status"])
            statuses[status] = statuses.get(status, 0) + 1

    asyncio.run(run())
    return statuses


def test_a_flood_of_refusals_is_counted_not_written_line_by_line(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = audit.trail(live.settings)
    trail.flush(force=True)
    before = trail.read_all()
    spool_before = _spool_bytes(live.settings.spool_dir)
    fill_before = Spool(live.settings.spool_dir).fill()
    writes = []
    real_write = os.write

    def counted_write(descriptor: int, data: bytes) -> int:
        if threading.current_thread() is threading.main_thread():
            writes.append(len(data))
        return real_write(descriptor, data)

    monkeypatch.setattr(audit.os, "write", counted_write)
    started = time.perf_counter()
    assert _flood(live, FLOOD) == {401: FLOOD}
    elapsed = time.perf_counter() - started
    # a refusal costs no disk write: the first one of each (reason, client) and nothing else
    assert len(writes) <= 4, len(writes)
    # over real HTTP too (keep-alive): the same counters
    with httpx.Client(base_url=live.url, timeout=30) as client:
        for _ in range(200):
            assert client.get("/v1/model").status_code == 401
    monkeypatch.undo()
    trail.flush(force=True)

    assert _audit_bytes(live) <= CAP
    assert _spool_bytes(live.settings.spool_dir) - spool_before < 16 * 1024
    assert abs(Spool(live.settings.spool_dir).fill() - fill_before) < 0.01
    added = trail.read_all()[len(before):]
    counts = _refusals(added)
    assert sum(counts.values()) == FLOOD + 200, counts
    assert counts[("no_credentials", "198.51.100.1")] == FLOOD // 2
    assert counts[("invalid_token", "198.51.100.2")] == FLOOD // 2
    assert counts[("no_credentials", "127.0.0.1")] == 200
    summaries = [r for r in added if r["event"] == "auth_failed_repeated"]
    assert {r["count"] for r in summaries} == {FLOOD // 2 - 1, 199}
    assert all(r["methods"] for r in summaries) and "wrong-key" not in str(added)
    assert len(added) <= 6
    # cheap: tens of microseconds a refusal in-process, whatever was written before
    assert FLOOD / elapsed > 1000, f"{FLOOD / elapsed:.0f} refusals/s"


def test_readiness_is_503_while_the_spool_is_past_the_watermark(live: Live) -> None:
    assert httpx.get(live.url + "/readyz").status_code == 200
    settings = live.runtime.settings
    limit = settings.spool_max_fill
    try:
        settings.spool_max_fill = 0.0001  # any real file system is fuller than this
        unready = httpx.get(live.url + "/readyz")
        assert unready.status_code == 503 and unready.json()["status"] == "unready"
        space = unready.json()["checks"]["spool_space"]
        assert space["ok"] is False and space["error"] == "spool_full"
        assert space["max_fill"] == 0.0001 and space["fill"] > 0.0001
        # what STOW-RS says at the same moment: the same check
        body, headers = related([b"not even DICOM"])
        refused = live.post("/dicomweb/studies", content=body, headers=headers)
        assert refused.status_code == 503 and refused.json()["code"] == "spool_full"
    finally:
        settings.spool_max_fill = limit
    ready = httpx.get(live.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["spool_space"]["ok"] is True


def test_an_authorised_stow_after_a_flood_is_still_accepted(
        live: Live, phantom_series: PhantomFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the incident: a small spool volume (here 8 MiB, refused past 30 %) filled by audit lines
    root = live.settings.spool_dir
    monkeypatch.setattr(live.runtime.spool, "fill",
                        lambda: _spool_bytes(root) / (8 * 1024**2))
    monkeypatch.setattr(live.runtime.settings, "spool_max_fill", 0.3)
    assert httpx.get(live.url + "/readyz").status_code == 200
    assert _flood(live, FLOOD, clients=3) == {401: FLOOD}
    ready = httpx.get(live.url + "/readyz")
    assert ready.status_code == 200, ready.json()
    body, headers = related([p.read_bytes()
                             for p in sorted(phantom_series(seed=13).glob("*.dcm"))])
    stored = live.post("/dicomweb/studies", content=body, headers=headers)
    assert stored.status_code == 200, stored.text
    assert _audit_bytes(live) <= CAP
    # the important events are still written one by one
    stow = [r for r in audit.trail(live.settings).read() if r["event"] == "stow"]
    assert stow and stow[-1]["who"] == "key:tester" and KEY not in str(stow)


def test_the_trail_is_rotated_and_keeps_at_most_n_files(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096, backups=3)
    for n in range(2000):
        trail.write("read", what="analysis", n=n, analysis_id="0" * 32)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all((tmp_path / name).stat().st_size <= 4096 for name in files)
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o600 for name in files)
    # the newest lines kept, each on its own, in order; the oldest dropped
    kept = [record["n"] for record in trail.read_all()]
    assert kept == list(range(kept[0], 2000)) and kept[0] > 0
    assert 3 * (4096 - 200) < sum((tmp_path / name).stat().st_size for name in files) <= 4 * 4096


def test_the_trail_is_rotated_once_by_several_writers(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path / "audit.jsonl", max_bytes=8192, backups=50)
    other = AuditLog(tmp_path / "audit.jsonl", max_bytes=8192, backups=50)  # another process

    def write(log: AuditLog, first: int) -> None:
        for n in range(first, first + 500):
            log.write("read", n=n)

    threads = [threading.Thread(target=write, args=(log, first))
               for log, first in ((trail, 0), (other, 500), (trail, 1000), (other, 1500))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(record["n"] for record in trail.read_all()) == list(range(2000))
    assert all(path.stat().st_size <= 8192 + 4 * 64 for path in trail.files())


def test_the_counts_of_a_closed_window_are_written_without_another_refusal(
        tmp_path: Path) -> None:
    trail = AuditLog(tmp_path / "audit.jsonl", refusal_window_s=1.0, refusal_max_keys=2)
    time.sleep(1.0 - time.time() % 1.0 + 0.01)  # at the start of a window (clock-aligned)
    firsts = [trail.refusal("auth_failed", reason="no_credentials", client=f"10.0.0.{n % 4}",
                            method="GET") for n in range(400)]
    assert sum(firsts) == 3  # two keys, then the first of the addresses sharing "*"
    deadline = time.monotonic() + 10
    while not any(r["event"] == "auth_failed_repeated" for r in trail.read()):
        assert time.monotonic() < deadline, "the window's counts were never written"
        time.sleep(0.05)
    time.sleep(0.2)
    records = trail.read()
    assert sum(r.get("count", 1) for r in records) == 400
    assert {r["client"] for r in records if r["event"] == "auth_failed_repeated"} == {
        "10.0.0.0", "10.0.0.1", "*"}
    # with the window at 0 every refusal is its own line (as before)
    plain = AuditLog(tmp_path / "plain.jsonl", refusal_window_s=0)
    for _ in range(3):
        assert plain.refusal("auth_failed", reason="invalid_token", client="10.0.0.9")
    assert len(plain.read()) == 3
