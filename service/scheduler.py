"""From stored instances to finished analyses: stability window, bounded queue, workers.

* STOW-RS (and later C-STORE) instances land in the spool and mark their series as "arriving";
  a series that has received nothing for ``stability_window_s`` is complete and gets an analysis.
  A series whose content was already analysed (same instances) is not analysed again.
* ``/v1/analyses`` uploads go straight to the queue.
* The queue is bounded: when it is full the caller gets :class:`Saturated` (HTTP 503 with
  Retry-After) before anything is accepted, so nothing accepted is ever dropped. Stable series
  wait in the window until there is room.
* Analyses run in worker threads (the event loop stays free); onnxruntime releases the GIL.
* On start, unfinished analyses are re-queued and spooled series without an analysis are
  picked up again, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import metrics
from service.config import Settings
from service.engine import Engine
from service.spool import SeriesKey, Spool
from service.store import FINISHED, AnalysisStore, Record, Status

log = logging.getLogger(__name__)


class Saturated(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the analysis queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    record: Record
    files: list[Path]
    done: asyncio.Future[Record]
    enqueued: float


def result_urls(analysis_id: str) -> dict[str, str]:
    return {"instances_url": f"/v1/analyses/{analysis_id}/instances",
            "preview_url": f"/v1/analyses/{analysis_id}/preview.png"}


class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, spool: Spool, store: AnalysisStore,
                 analyse: Callable[..., Any] | None = None) -> None:
        self.settings, self.engine, self.spool, self.store = settings, engine, spool, store
        if analyse is None:
            from service.analysis import analyse as default_analyse
            analyse = default_analyse
        self._analyse = analyse
        # Unbounded underneath: the bound is enforced on new work only, so that restart recovery
        # can re-queue everything that was accepted before.
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=settings.workers,
                                            thread_name_prefix="analysis")
        self._arriving: dict[SeriesKey, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._rules: Any = None
        if settings.flair_rules is not None:
            from service.flair import load_rules
            self._rules = load_rules(settings.flair_rules)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        for record in self.store.unfinished():
            files = self._files_of(record)
            if files:
                self._enqueue(record, files, force=True)
            else:
                self.store.update(record.id, Status.FAILED, problem={
                    "code": "input_lost", "detail": "the spooled input is gone"})
        now = time.monotonic()
        for key in self.spool.pending_series():
            self._arriving.setdefault(key, now)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._watch_stable_series()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=True)

    # -- state -------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def saturated(self) -> bool:
        return self._queue.qsize() >= self.settings.max_queue

    @property
    def arriving(self) -> int:
        return len(self._arriving)

    def check_capacity(self) -> None:
        if self.saturated:
            raise Saturated(self.settings.retry_after_s)

    # -- input -------------------------------------------------------------------------------
    def note_arrival(self, key: SeriesKey) -> None:
        self._arriving[key] = time.monotonic()
        metrics.SERIES_ARRIVING.set(len(self._arriving))

    def submit_upload(self, files: list[Path], record: Record) -> asyncio.Future[Record]:
        """Queue an uploaded series (already spooled under ``record``); :class:`Saturated`
        when the queue is full."""
        return self._enqueue(record, files)

    # -- internals ---------------------------------------------------------------------------
    def _files_of(self, record: Record) -> list[Path]:
        if record.source == "upload":
            return sorted(self.spool.upload_folder(record.id).glob("*.dcm"))
        if record.study_instance_uid and record.series_instance_uid:
            return self.spool.series_files(
                SeriesKey(record.study_instance_uid, record.series_instance_uid))
        return []

    def _enqueue(self, record: Record, files: list[Path], force: bool = False
                 ) -> asyncio.Future[Record]:
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        job = _Job(record, files, future, time.monotonic())
        if self.saturated and not force:
            raise Saturated(self.settings.retry_after_s)
        self._queue.put_nowait(job)
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return future

    async def _watch_stable_series(self) -> None:
        window = self.settings.stability_window_s
        period = max(0.05, min(0.5, window / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for key, last in sorted(self._arriving.items(), key=lambda item: item[1]):
                if now - last < window or self.saturated:
                    continue
                del self._arriving[key]
                self._series_complete(key)
            metrics.SERIES_ARRIVING.set(len(self._arriving))

    def _series_complete(self, key: SeriesKey) -> None:
        files = self.spool.series_files(key)
        if not files:
            return
        fingerprint = self.spool.fingerprint(key)
        existing = self.store.find_series(key.series_instance_uid, fingerprint)
        if existing is not None:
            log.info("series already analysed", extra={"analysis_id": existing.id})
            return
        record = self.store.create("stow", key.study_instance_uid, key.series_instance_uid,
                                   fingerprint)
        self._enqueue(record, files)

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            metrics.QUEUE_WAIT.observe(time.monotonic() - job.enqueued)
            self._in_flight += 1
            metrics.IN_FLIGHT.inc()
            try:
                record = await loop.run_in_executor(self._executor, self._run, job)
            except Exception as error:  # _run records its own failures; this is a last resort
                log.exception("analysis worker error")
                record = job.record
                if not job.done.done():
                    job.done.set_exception(error)
            else:
                if not job.done.done():
                    job.done.set_result(record)
            finally:
                self._in_flight -= 1
                metrics.IN_FLIGHT.dec()
                self._queue.task_done()

    def _run(self, job: _Job) -> Record:
        """One analysis, in a worker thread; every outcome ends up in the store."""
        from service.analysis import AnalysisRejected, write_outputs

        record = job.record
        self.store.update(record.id, Status.RUNNING)
        started = time.perf_counter()
        try:
            analysis = self._analyse(job.files, self.engine, rules=self._rules,
                                     accept_non_flair=self.settings.accept_non_flair)
        except AnalysisRejected as rejected:
            problem = {"code": rejected.code, "detail": rejected.message,
                       "warnings": [str(w) for w in getattr(rejected, "warnings", ())]}
            self.store.update(record.id, Status.REJECTED, problem=problem)
            metrics.SERIES_ANALYSED.labels(outcome=f"rejected:{rejected.code}").inc()
            log.info("analysis rejected", extra={"analysis_id": record.id,
                                                 "code": rejected.code})
        except Exception as error:
            self.store.update(record.id, Status.FAILED, problem={
                "code": "analysis_failed", "detail": f"{type(error).__name__}: {error}"})
            metrics.SERIES_ANALYSED.labels(outcome="failed").inc()
            log.exception("analysis failed", extra={"analysis_id": record.id})
        else:
            folder = self.spool.result_folder(record.id)
            write_outputs(analysis, folder)
            result = analysis.to_json()
            result.update({"analysis_id": record.id, "status": str(Status.DONE)})
            result.setdefault("outputs", {}).update(result_urls(record.id))
            (folder / "result.json").write_text(json.dumps(result, indent=2))
            self.store.update(record.id, Status.DONE, result=result,
                              study_instance_uid=analysis.study_instance_uid,
                              series_instance_uid=analysis.series_instance_uid)
            metrics.SERIES_ANALYSED.labels(outcome="ok").inc()
            metrics.PREDICTIONS.labels(**{"class": analysis.prediction}).inc()
            for stage, ms in analysis.timings_ms.items():
                metrics.STAGE_DURATION.labels(stage=stage).observe(ms / 1000)
            log.info("analysis done", extra={
                "analysis_id": record.id, "prediction": analysis.prediction,
                "total_ms": round((time.perf_counter() - started) * 1000, 1)})
        if record.source == "upload":
            self.spool.remove_upload(record.id)
        final = self.store.get(record.id)
        assert final is not None and final.status in FINISHED
        return final
