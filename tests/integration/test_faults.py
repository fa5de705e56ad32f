"""Faults on the analysis path (issue 13): the disk full while a result is written, a crash
between "done" and "deliveries planned", an analysis that kills its process every time."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import service.storage.results
from service.core.config import Settings
from service.core.destinations import Destination
from service.runtime.forward import Forwarder
from service.runtime.scheduler import MAX_STARTS, Scheduler
from service.storage.deliveries import DeliveryState, DeliveryStore
from service.storage.spool import Spool
from service.storage.store import AnalysisStore, Record, Status
from tests._pacs import Flaircad, flaircad_settings, free_port, wait_until
from tests.conftest import PhantomFactory
from tests.integration.test_forward import SLICES, StowReceiver, _analyse

REPO = Path(__file__).resolve().parents[2]


class _Engine:
    provider = "CPUExecutionProvider"


@dataclass
class _Analysis:
    """What :func:`service.pipeline.analysis.analyse` returns, as far as the scheduler looks."""

    study_instance_uid: str = "1.2.826.0.1.3680043.8.498.1"
    series_instance_uid: str = "1.2.826.0.1.3680043.8.498.2"
    prediction: str = "MS"
    timings_ms: dict[str, float] = field(default_factory=dict)
    sc_instances: list[bytes] = field(default_factory=lambda: [b"sc"])
    pm_instance: bytes | None = None
    sr_instance: bytes | None = b"sr"
    preview_png: bytes = b"png"

    def to_json(self) -> dict[str, Any]:
        return {"prediction": self.prediction, "outputs": {}}


class _RefusingStore(AnalysisStore):
    """The database is full too: the first ``refuse`` writes of a final status fail."""

    refuse = 0

    def update(self, analysis_id: str, status: Status, **fields: Any) -> None:
        if status in (Status.FAILED, Status.DONE) and self.refuse > 0:
            self.refuse -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().update(analysis_id, status, **fields)


def _upload(spool: Spool, store: AnalysisStore, owner: str) -> tuple[Record, list[Path]]:
    record = store.create("upload", owner=owner)
    path = spool.upload_folder(record.id) / "00000.dcm"
    path.write_bytes(b"stand-in")
    return record, [path]


async def _until(probe: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- 7: the disk full while a result is written -----------------------------------------------
@pytest.mark.parametrize(("where", "error", "code"), [
    ("write", errno.ENOSPC, "spool_full"), ("publish", errno.EIO, "result_write_failed")])
def test_a_result_that_cannot_be_written_fails_with_a_reason_and_leaves_no_staging(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, error: int,
        code: str) -> None:
    settings = Settings(spool_dir=tmp_path, orphan_sweep_interval_s=0.2, spool_max_fill=1.0)
    spool, store = Spool(tmp_path), _RefusingStore(tmp_path / "flaircad.sqlite")
    faults = {where}
    publish = spool.publish_result

    def write_outputs(analysis: Any, out: Path) -> None:
        (out / "sc").mkdir(parents=True, exist_ok=True)
        (out / "sc" / "IM0001.dcm").write_bytes(b"written")
        if "write" in faults:
            raise OSError(error, os.strerror(error), str(out / "sc" / "IM0002.dcm"))
        (out / "sr.dcm").write_bytes(b"written")

    def publish_result(staging: Path, analysis_id: str) -> Path:
        if "publish" in faults:
            raise OSError(error, os.strerror(error))
        return publish(staging, analysis_id)

    monkeypatch.setattr(service.storage.results, "write_outputs", write_outputs)
    monkeypatch.setattr(spool, "publish_result", publish_result)

    async def run() -> None:
        scheduler = Scheduler(settings, _Engine(), spool, store,  # type: ignore[arg-type]
                              analyse=lambda *a, **k: _Analysis())
        await scheduler.start()
        try:
            store.refuse = 1  # and the failure path's own write fails too
            record, files = _upload(spool, store, scheduler.owner)
            ended = await scheduler.submit_upload(files, record)
            # the waiting client is told at once, and nothing half-written is left
            assert ended.status is Status.FAILED and ended.problem is not None
            assert ended.problem["code"] == code
            assert str(tmp_path) not in ended.problem["detail"]
            assert not list(spool.results.glob(".staging-*"))
            assert not spool.result_folder(record.id).exists()
            # the database took nothing yet: the orphan sweep writes it when it can
            assert store.get(record.id).status is Status.RUNNING  # type: ignore[union-attr]
            await _until(lambda: store.get(record.id).status is Status.FAILED)  # type: ignore[union-attr]
            stored = store.get(record.id)
            assert stored is not None and stored.problem is not None
            assert stored.problem["code"] == code
            assert not (spool.uploads / record.id).exists()  # once recorded, the input goes
            # the worker lives on: the next analysis is done
            faults.clear()
            record, files = _upload(spool, store, scheduler.owner)
            assert (await scheduler.submit_upload(files, record)).status is Status.DONE
            assert (spool.result_folder(record.id) / "result.json").is_file()
        finally:
            await scheduler.stop(grace_s=5)

    asyncio.run(run())
    store.close()


def test_a_really_full_volume_fails_the_analysis_and_frees_its_staging(tmp_path: Path) -> None:
    """A 1 MiB tmpfs as the spool (needs root: skipped elsewhere); the result does not fit."""
    root = tmp_path / "tmpfs"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        settings = Settings(spool_dir=root, spool_max_fill=1.0)
        spool, store = Spool(root), AnalysisStore(root / "flaircad.sqlite")
        big = _Analysis(sc_instances=[os.urandom(256 * 1024) for _ in range(8)])

        async def run() -> Record:
            scheduler = Scheduler(settings, _Engine(), spool, store,  # type: ignore[arg-type]
                                  analyse=lambda *a, **k: big)
            await scheduler.start()
            try:
                record, files = _upload(spool, store, scheduler.owner)
                return await scheduler.submit_upload(files, record)
            finally:
                await scheduler.stop(grace_s=5)

        ended = asyncio.run(run())
        stored = store.get(ended.id)
        store.close()
        assert stored is not None and stored.status is Status.FAILED
        assert stored.problem is not None and stored.problem["code"] == "spool_full"
        assert not list(spool.results.glob(".staging-*"))
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_done_that_the_database_refuses_is_recorded_later_and_then_delivered(
        tmp_path: Path) -> None:
    """The result is published, the database is full: "done" (and its deliveries) come as
    soon as the database takes writes again."""
    settings = Settings(spool_dir=tmp_path, orphan_sweep_interval_s=0.2, spool_max_fill=1.0)
    spool, store = Spool(tmp_path), _RefusingStore(tmp_path / "flaircad.sqlite")

    async def run() -> None:
        scheduler = Scheduler(settings, _Engine(), spool, store,  # type: ignore[arg-type]
                              analyse=lambda *a, **k: _Analysis())
        ready: list[str] = []
        scheduler.result_hooks.append(ready.append)
        await scheduler.start()
        try:
            store.refuse = 2  # the first try and the first retry
            record, files = _upload(spool, store, scheduler.owner)
            ended = await scheduler.submit_upload(files, record)
            assert ended.status is Status.DONE and ready == []
            await _until(lambda: ready == [record.id])
            assert store.get(record.id).status is Status.DONE  # type: ignore[union-attr]
        finally:
            await scheduler.stop(grace_s=5)

    asyncio.run(run())
    store.close()


# -- 11: a crash between "done" and "deliveries planned" ---------------------------------------
def test_a_result_done_but_never_planned_is_delivered_after_the_restart(
        tmp_path: Path, phantom_series: PhantomFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with StowReceiver() as receiver:
        destination = Destination(name="pacs", kind="stow", url=receiver.url, timeout_s=10)
        settings = flaircad_settings(tmp_path / "spool", destinations=[destination])

        def dies(self: Forwarder, analysis_id: str) -> None:  # the process dies here
            raise SystemError("killed between 'done' and 'deliveries planned'")

        monkeypatch.setattr(Forwarder, "result_ready", dies)
        first = Flaircad(settings, free_port()).start()
        try:
            analysis = _analyse(first, phantom_series(label="MS", seed=93, slices=SLICES))
        finally:
            first.stop()
        monkeypatch.undo()
        deliveries = DeliveryStore(settings.spool_dir / "flaircad.sqlite")
        assert deliveries.of_analysis(analysis["analysis_id"]) == [] and not receiver.requests

        second = Flaircad(settings, free_port()).start()  # same spool, same database
        try:
            def sent() -> bool:
                rows = deliveries.of_analysis(analysis["analysis_id"])
                return bool(rows) and rows[0].state is DeliveryState.SENT

            wait_until(sent, 30, "the delivery planned at the restart")
        finally:
            second.stop()
            deliveries.close()
    (request,) = receiver.requests
    uids = {str(ds.SOPInstanceUID) for ds in request["datasets"]}
    # the SC series, the map and the SR
    assert analysis["outputs"]["sr_sop_instance_uid"] in uids and len(uids) == SLICES + 2


def test_reconciling_plans_each_missing_delivery_once(tmp_path: Path) -> None:
    path = tmp_path / "flaircad.sqlite"
    analyses, deliveries = AnalysisStore(path), DeliveryStore(path)
    pacs = Destination(name="pacs", kind="stow", url="http://127.0.0.1:9/dicom-web")
    archive = Destination(name="archive", kind="stow", url="http://127.0.0.1:9/dicom-web")
    done, failed, planned = (analyses.create("upload") for _ in range(3))
    for record, status in ((done, Status.DONE), (failed, Status.FAILED), (planned, Status.DONE)):
        analyses.update(record.id, status)
    deliveries.plan(planned.id, [pacs])
    deliveries.record(planned.id, "pacs", DeliveryState.SENT, attempts=1, instances=3)
    assert deliveries.plan_missing([pacs, archive]) == 3  # done×2, planned×archive
    assert deliveries.plan_missing([pacs, archive]) == 0
    assert {d.destination: d.state for d in deliveries.of_analysis(planned.id)} == {
        "pacs": DeliveryState.SENT, "archive": DeliveryState.PENDING}
    assert len(deliveries.of_analysis(done.id)) == 2
    assert deliveries.of_analysis(failed.id) == []
    analyses.close()
    deliveries.close()


# -- 4: an analysis that kills its process each time it runs ----------------------------------
_KILLED_WHILE_ANALYSING = """
import asyncio, os, signal, sys
from pathlib import Path
from service.core.config import Settings
from service.runtime.scheduler import Scheduler
from service.storage.spool import Spool
from service.storage.store import AnalysisStore

class Engine:
    provider = "CPUExecutionProvider"

def analyse(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does

async def main():
    root = Path(sys.argv[1])
    scheduler = Scheduler(Settings(spool_dir=root, workers=1), Engine(), Spool(root),
                          AnalysisStore(root / "flaircad.sqlite"), analyse=analyse)
    await scheduler.start()
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_an_analysis_that_killed_its_process_twice_is_failed_not_resumed(
        tmp_path: Path) -> None:
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / "flaircad.sqlite")
    deadly, _ = _upload(spool, store, owner="host-1-gone")  # first in the queue
    once, _ = _upload(spool, store, owner="host-1-gone")
    store.start(once.id)  # its process died once, then it waited behind the deadly one
    for run in range(1, MAX_STARTS + 1):
        crashed = subprocess.run(
            [sys.executable, "-c", _KILLED_WHILE_ANALYSING, str(tmp_path)], cwd=REPO,
            timeout=120, capture_output=True)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
        assert store.get(deadly.id).attempts == run  # type: ignore[union-attr]
    assert store.get(deadly.id).status is Status.RUNNING  # type: ignore[union-attr]
    assert store.get(once.id).attempts == 1  # type: ignore[union-attr]
    (spool.results / f".staging-{deadly.id}-0badf00d").mkdir()  # what a killed one left

    ran: list[str] = []

    def analyse(files: list[Path], *args: Any, **kwargs: Any) -> Any:
        ran.append(files[0].parent.name)
        return _Analysis()

    async def run() -> None:
        scheduler = Scheduler(Settings(spool_dir=tmp_path, spool_max_fill=1.0), _Engine(),  # type: ignore[arg-type]
                              spool, store, analyse=analyse)
        await scheduler.start()
        await _until(lambda: store.get(once.id).status is Status.DONE)  # type: ignore[union-attr]
        await scheduler.stop(grace_s=5)

    asyncio.run(run())
    assert ran == [once.id]  # crashed once: resumed; crashed twice: not
    failed = store.get(deadly.id)
    assert failed is not None and failed.status is Status.FAILED
    assert failed.problem is not None and failed.problem["code"] == "crashed_twice"
    assert not (spool.uploads / deadly.id).exists()
    assert not list(spool.results.glob(".staging-*"))
    assert store.get(once.id).attempts == 2  # type: ignore[union-attr]
    store.close()


def test_an_analysis_that_crashed_once_runs_again_and_the_count_survives_migration(
        tmp_path: Path) -> None:
    path = tmp_path / "flaircad.sqlite"
    with sqlite3.connect(path) as db:  # a database from before the attempts column
        db.execute("CREATE TABLE analyses (id TEXT PRIMARY KEY, status TEXT NOT NULL, source TEXT "
                   "NOT NULL, study_instance_uid TEXT, series_instance_uid TEXT, fingerprint "
                   "TEXT, created REAL NOT NULL, updated REAL NOT NULL, result TEXT, problem "
                   "TEXT, owner TEXT)")
        db.execute("INSERT INTO analyses VALUES ('a', 'running', 'upload', NULL, NULL, NULL, 1, "
                   "1, NULL, NULL, 'host-1-gone')")
    spool, store = Spool(tmp_path), AnalysisStore(path)
    (old,) = store.unfinished()
    assert old.attempts == 0
    store.start("a")  # one crash
    (spool.upload_folder("a") / "00000.dcm").write_bytes(b"stand-in")
    ran: list[str] = []

    def analyse(files: list[Path], *args: Any, **kwargs: Any) -> Any:
        ran.append(files[0].parent.name)
        return _Analysis()

    async def run() -> None:
        scheduler = Scheduler(Settings(spool_dir=tmp_path, spool_max_fill=1.0), _Engine(),  # type: ignore[arg-type]
                              spool, store, analyse=analyse)
        await scheduler.start()
        await _until(lambda: store.get("a").status is Status.DONE)  # type: ignore[union-attr]
        await scheduler.stop(grace_s=5)

    asyncio.run(run())
    assert ran == ["a"] and store.get("a").attempts == 2  # type: ignore[union-attr]
    store.close()


def test_a_synchronous_upload_whose_result_finds_the_disk_full_is_503(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phantom_series: PhantomFactory) -> None:
    """The waiting client of ``POST /v1/analyses`` is told the truth: the spool is full, try
    again later (503 spool_full + Retry-After), not 500; and the service goes on."""
    from tests._live import related, running, settings_for

    files = sorted(phantom_series(label="MS", seed=105).glob("*.dcm"))
    full = [True]
    real = service.storage.results.write_outputs

    def write_outputs(analysis: Any, out: Path) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "sr.dcm"))
        real(analysis, out)

    monkeypatch.setattr(service.storage.results, "write_outputs", write_outputs)
    with running(settings_for(tmp_path / "spool")) as live:
        body, headers = related([p.read_bytes() for p in files])
        refused = live.post("/v1/analyses", content=body, headers=headers)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "spool_full"
        assert int(refused.headers["Retry-After"]) > 0
        full[0] = False  # space again: the same upload is analysed, not answered from cache
        again = live.post("/v1/analyses", content=body, headers=headers)
        assert again.status_code == 200, again.text
