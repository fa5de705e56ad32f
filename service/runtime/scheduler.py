"""From stored instances to finished analyses: stability window, bounded queue, workers.

* STOW-RS (and later C-STORE) instances land in the spool and mark their series as "arriving";
  a series that has received nothing for ``stability_window_s`` is complete and gets an analysis.
  A series whose content was already analysed (same instances) is not analysed again.
  The window's bookkeeping is :class:`service.runtime.arrivals.ArrivalWindow`: a series with a
  STOW-RS request for it still in flight is not complete, open series are bounded
  (:class:`TooManyOpenSeries`, HTTP 503), complete ones are claimed round-robin over senders,
  and a claim that fails (disk full) leaves the series in the window, retried with backoff.
* ``/v1/analyses`` uploads go straight to the queue.
* The queue is bounded: when it is full the caller gets :class:`Saturated` (HTTP 503 with
  Retry-After) before anything is accepted, so nothing accepted is ever dropped. Stable series
  wait in the window until there is room.
* Analyses run in worker threads (the event loop stays free); onnxruntime releases the GIL.
* On start, unfinished analyses are re-queued and spooled series without an analysis are
  picked up again, so a restart loses nothing.
* Several processes (uvicorn workers) may run one scheduler each over the same spool and
  database. Instances of one series may reach different processes, so "complete" is judged
  from the series folder's mtime (shared), not from what this process saw, and the analysis is
  claimed atomically in SQLite (:meth:`AnalysisStore.claim_series`): it runs once. Each process
  holds a lease; analyses of a process that died are taken over by another (or by the next
  start).
* Draining (SIGTERM): no new work is accepted (:class:`Draining`, HTTP 503), queued and running
  analyses go on until the queue is empty or the grace period is over; what is left stays
  ``queued``/``running`` in the store and resumes on the next start.
* Every accepted analysis ends ``done``, ``rejected`` or ``failed`` with a reason code, also
  when the disk fills while its result is written (``spool_full``, ``result_write_failed``;
  the staging folder goes first). When the database refuses even that write, the outcome is
  kept in memory and written by the orphan sweep. A run is counted in the store before it
  starts: an analysis whose process died while running it :data:`MAX_STARTS` times (out of
  memory, say) is not resumed again but fails (``crashed_twice``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.core.codes import Code
from service.core.config import Settings
from service.core.limits import Limits
from service.pipeline.engine import Engine
from service.runtime import logs, metrics, retention
from service.runtime.arrivals import ArrivalWindow, Hold
from service.runtime.audit import trail
from service.storage.spool import SeriesKey, Spool
from service.storage.store import FINISHED, AnalysisStore, Record, Status

if TYPE_CHECKING:  # the pipeline's analysis module is imported when the first job runs
    from service.core.flair import RuleSet
    from service.pipeline.analysis import Analysis

log = logging.getLogger(__name__)

# An analysis started this often without finishing killed its process each time (the OOM
# killer, say): resuming it again would crash-loop the service.
MAX_STARTS = 2


class Saturated(Exception):
    """No new work now (HTTP 503 with Retry-After); ``code`` says why."""

    code: Code = Code.SATURATED

    def __init__(self, retry_after_s: int, detail: str | None = None) -> None:
        super().__init__(detail or f"the analysis queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class SpoolFull(Saturated):
    """The spool's file system is past ``spool_max_fill``: no new data until the retention
    sweep (or an operator) frees space."""

    code = Code.SPOOL_FULL

    def __init__(self, retry_after_s: int, fill: float, limit: float) -> None:
        super().__init__(retry_after_s, f"the spool volume is {fill:.1%} full (limit "
                         f"{limit:.1%}, FLAIRCAD_SPOOL_MAX_FILL); retry after {retry_after_s} s")
        self.fill, self.limit = fill, limit


class TooManyOpenSeries(Saturated):
    """The stability window holds ``FLAIRCAD_MAX_OPEN_SERIES`` series (or the sender its
    ``FLAIRCAD_MAX_OPEN_SERIES_PER_SENDER``): no new series until some are claimed."""

    code = Code.TOO_MANY_OPEN_SERIES

    def __init__(self, retry_after_s: int, limit: int, per_sender: int) -> None:
        super().__init__(retry_after_s, "too many series are being received (at most "
                         f"{limit}, {per_sender} per sender: FLAIRCAD_MAX_OPEN_SERIES, "
                         "FLAIRCAD_MAX_OPEN_SERIES_PER_SENDER); instances of series already "
                         f"being received are taken; retry after {retry_after_s} s")


class Draining(Saturated):
    code = Code.DRAINING

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(retry_after_s, "the service is shutting down; retry after "
                         f"{retry_after_s} s (another instance may take it)")


@dataclass
class _Job:
    record: Record
    files: list[Path]
    done: asyncio.Future[Record]
    enqueued: float
    request_id: str | None = None


@dataclass
class _Unrecorded:
    """How an analysis ended, when the database refused to record it: retried later."""

    record: Record
    status: Status
    fields: dict[str, Any]


def _disk_full(error: BaseException) -> bool:
    """No space left: on the spool's file system (ENOSPC, EDQUOT) or in SQLite."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return False


def client_label(path: Path) -> str:
    """How a client knows one of its inputs: an upload's part by its place in the request
    (files are stored as 00000.dcm, 00001.dcm, …), a received instance by its SOP UID."""
    stem = Path(path).stem
    return f"part {int(stem) + 1}" if stem.isdigit() else f"instance {stem}"


def client_text(text: str, files: list[Path], spool_root: Path) -> str:
    """``text`` with every server path of ``files`` replaced by its :func:`client_label`, and
    any other path under the spool cut to ``<spool>``."""
    for path in sorted(files, key=lambda p: len(str(p)), reverse=True):
        text = text.replace(str(path), client_label(path))
    return text.replace(str(Path(spool_root).resolve()), "<spool>").replace(
        str(spool_root), "<spool>")


class Analyse(Protocol):
    """How the scheduler runs one analysis: :func:`service.pipeline.analysis.analyse`, or a
    test's stand-in."""

    def __call__(self, sources: list[Path], engine: Engine, *, rules: RuleSet | None,
                 accept_non_flair: bool, limits: Limits, explanation: str) -> Analysis: ...


class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, spool: Spool, store: AnalysisStore,
                 analyse: Analyse | None = None) -> None:
        self.settings, self.engine, self.spool, self.store = settings, engine, spool, store
        if analyse is None:
            from service.pipeline.analysis import analyse as default_analyse
            analyse = default_analyse
        self._analyse: Analyse = analyse
        # Unbounded underneath: the bound is enforced on new work only, so that restart recovery
        # can re-queue everything that was accepted before.
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=settings.workers,
                                            thread_name_prefix="analysis")
        self.arrivals = ArrivalWindow(settings.max_open_series,
                                      settings.max_open_series_per_sender)
        # the window's last-arrival times (start-up recovery and retention read them)
        self._arriving = self.arrivals.last
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._draining = False
        self._drain_deadline: float | None = None
        self._drain_reported = False
        self._lease = spool.acquire_lease()
        self._rules: RuleSet | None = None
        # called with the id of every analysis that ends DONE, in its worker thread (results
        # sent to the PACS: service/runtime/pacs.py)
        self.result_hooks: list[Callable[[str], None]] = []
        # outcomes the database refused (disk full, busy): the orphan sweep writes them
        self._unrecorded: dict[str, _Unrecorded] = {}
        self._unrecorded_lock = threading.Lock()
        self._limits = Limits.of(settings)
        self._audit = trail(settings)
        if settings.flair_rules is not None:
            from service.core.flair import load_rules
            self._rules = load_rules(settings.flair_rules)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def owner(self) -> str:
        return self._lease.token

    async def start(self) -> None:
        self._take_over_orphans()
        now = time.monotonic()
        for key in self.spool.pending_series():
            self._arriving.setdefault(key, now)
        metrics.SERIES_ARRIVING.set(len(self._arriving))
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._watch_stable_series()))
        self._tasks.append(asyncio.create_task(self._sweep_orphans()))
        self._tasks.append(asyncio.create_task(self._sweep_retention()))

    def begin_drain(self) -> None:
        if not self._draining:
            self._draining = True
            metrics.DRAINING.set(1)
            log.info("draining: no new work accepted", extra={
                "queued": self.queue_depth, "in_flight": self._in_flight,
                "series_in_stability_window": len(self._arriving)})

    async def drain(self, grace_s: float) -> bool:
        """Stop taking work and wait until the queued and running analyses are done, at most
        ``grace_s``; True when nothing is left."""
        self.begin_drain()
        if self._drain_deadline is None:  # one grace period, however often this is called
            self._drain_deadline = time.monotonic() + grace_s
        deadline = self._drain_deadline
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self._drain_reported:  # the SIGTERM handler and the shutdown both come here
            self._drain_reported = True
            if self.idle:
                log.info("drained: every accepted analysis has finished")
            else:
                log.warning("grace period over: unfinished analyses resume on the next start",
                            extra={"queued": self.queue_depth, "in_flight": self._in_flight})
        return self.idle

    def end_grace_now(self) -> None:
        """Stop waiting for analyses (a second SIGTERM); they resume on the next start."""
        self.begin_drain()
        self._drain_deadline = time.monotonic()

    async def stop(self, grace_s: float = 0.0) -> None:
        drained = await self.drain(grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Past the grace period a running analysis is abandoned (its row stays "running" and
        # is taken over later); waiting for it here would stretch the grace period.
        self._executor.shutdown(wait=drained, cancel_futures=True)
        if drained:
            self._lease.release()
        # else: the lease goes when the process does, so no sibling takes over an analysis
        # whose thread still runs here.

    # -- state -------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def saturated(self) -> bool:
        return self._queue.qsize() >= self.settings.max_queue

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def idle(self) -> bool:
        return self._queue.qsize() == 0 and self._in_flight == 0

    @property
    def arriving(self) -> int:
        return len(self.arrivals)

    def check_capacity(self) -> None:
        if self._draining:
            raise Draining(self.settings.retry_after_s)
        self.check_spool_space()
        if self.saturated:
            raise Saturated(self.settings.retry_after_s)

    def check_spool_space(self) -> float | None:
        """:class:`SpoolFull` when the spool's file system is past the watermark; else its
        fill (None: unknown). STOW-RS, uploads and readiness all ask this."""
        try:
            fill = self.spool.fill()
        except OSError:  # cannot tell: the write itself will say
            return None
        if fill >= self.settings.spool_max_fill:
            raise SpoolFull(self.settings.retry_after_s, fill, self.settings.spool_max_fill)
        return fill

    # -- input -------------------------------------------------------------------------------
    def note_arrival(self, key: SeriesKey) -> None:
        """An instance of ``key`` was stored: its window restarts (no bound: it is on disk)."""
        self.arrivals.note(key)
        metrics.SERIES_ARRIVING.set(len(self.arrivals))

    def open_series(self, key: SeriesKey, sender: str) -> bool:
        """Before an instance of ``key`` is stored: False when it would open a series past
        the window's bounds (any thread: C-STORE calls it from the listener's)."""
        opened = self.arrivals.open(key, sender)
        metrics.SERIES_ARRIVING.set(len(self.arrivals))
        return opened

    def hold_series(self, sender: str) -> Hold:
        """For one STOW-RS request: the series its parts belong to stay open, never stable,
        until the hold is released (in a ``finally``); :class:`TooManyOpenSeries` from
        :meth:`Hold.add` when a part would open a series past the bounds."""
        return Hold(self.arrivals, sender, self._too_many_open_series)

    def _too_many_open_series(self) -> TooManyOpenSeries:
        return TooManyOpenSeries(self.settings.retry_after_s, self.settings.max_open_series,
                                 self.settings.max_open_series_per_sender)

    def submit_upload(self, files: list[Path], record: Record) -> asyncio.Future[Record]:
        """Queue an uploaded series (already spooled under ``record``); :class:`Saturated`
        when the queue is full, :class:`Draining` when shutting down."""
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
        job = _Job(record, files, future, time.monotonic(), logs.REQUEST_ID.get())
        if not force:
            self.check_capacity()
        self._queue.put_nowait(job)
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        log.info("analysis queued", extra={"analysis_id": record.id, "source": record.source,
                                           "queue_depth": self._queue.qsize()})
        return future

    def _take_over_orphans(self) -> int:
        """Queue the unfinished analyses whose owner process is gone (all of them at start,
        when this is the only process); fail those that were started :data:`MAX_STARTS`
        times already, each time without finishing."""
        taken = 0
        for record in self.store.unfinished():
            if record.owner == self.owner or self.spool.owner_alive(record.owner):
                continue
            if not self.store.take_over(record.id, record.owner, self.owner):
                continue  # another process was quicker
            taken += 1
            self._remove_staging(record.id)  # what its dead owner was writing
            if record.attempts >= MAX_STARTS:
                self._give_up(record)
                continue
            files = self._files_of(record)
            if files:
                self._enqueue(record, files, force=True)
                log.info("analysis taken over from a process that is gone",
                         extra={"analysis_id": record.id, "attempts": record.attempts})
            else:
                self._finish(record, Status.FAILED, problem={
                    "code": Code.INPUT_LOST, "detail": "the spooled input is gone"})
        return taken

    def _give_up(self, record: Record) -> None:
        """An analysis that killed its process every time it ran fails for good."""
        log.error("analysis ended its process each time it ran: failed, not resumed",
                  extra={"analysis_id": record.id, "attempts": record.attempts})
        metrics.SERIES_ANALYSED.labels(outcome="failed").inc()
        final, recorded = self._finish(record, Status.FAILED, problem={
            "code": Code.CRASHED_TWICE,
            "detail": f"the service process ended while running this analysis "
                      f"{record.attempts} times (out of memory, say); it is not tried again"})
        if recorded:
            self._after_finish(final)

    def _remove_staging(self, analysis_id: str) -> None:
        self.spool.result_folders.remove_staging(analysis_id)

    async def _sweep_retention(self) -> None:
        """Expired analyses, their results and inputs go (service/runtime/retention.py); the first
        sweep runs at start, which also clears what a crash left behind."""
        while True:
            try:
                await asyncio.to_thread(retention.sweep, self.settings, self.spool, self.store,
                                        busy=self.arrivals.keys(), audit=self._audit)
            except Exception:  # the database busy, a file system hiccup: next time
                log.exception("retention sweep failed")
            await asyncio.sleep(self.settings.retention_sweep_interval_s)

    async def _sweep_orphans(self) -> None:
        while True:
            await asyncio.sleep(self.settings.orphan_sweep_interval_s)
            if self._unrecorded:  # also while draining: these analyses have ended
                try:
                    await asyncio.to_thread(self._record_late)
                except Exception:
                    log.exception("cannot record the outcomes of ended analyses")
            if self._draining:
                continue
            try:
                self._take_over_orphans()
            except Exception:  # the database busy for 30 s, say: try again next time
                log.exception("orphan sweep failed")

    async def _watch_stable_series(self) -> None:
        window = self.settings.stability_window_s
        period = max(0.05, min(0.5, window / 4))
        while True:
            await asyncio.sleep(period)
            if self._draining:  # left in the spool; the next start picks them up
                continue
            for key in self.arrivals.stable(window):  # quiet, not held; fair order
                if self.saturated:  # they wait in the window for room in the queue
                    break
                self._claim_if_quiet(key, window)
            metrics.SERIES_ARRIVING.set(len(self.arrivals))

    def _claim_if_quiet(self, key: SeriesKey, window: float) -> None:
        try:
            # Another process may have received instances of it since: the folder knows.
            age = self.spool.series_age_s(key)
            if age is not None and age < window:
                self.arrivals.note(key, at=time.monotonic() - age)
                return
            self._series_complete(key)
        except Exception as error:  # disk full, database busy: it stays in the window
            retry_in = self.arrivals.claim_failed(key)
            # the type and errno only: an OSError's text holds the series folder (its UIDs)
            log.warning("cannot queue a complete series; it stays in the stability window",
                        extra={"error": type(error).__name__,
                               "errno": getattr(error, "errno", None),
                               "retry_in_s": retry_in})
        else:
            self.arrivals.claimed(key)

    def _series_complete(self, key: SeriesKey) -> None:
        files = self.spool.series_files(key)
        if not files:
            return
        fingerprint = self.spool.fingerprint(key)
        existing = self.store.find_series(key.series_instance_uid, fingerprint)
        if existing is not None:
            log.info("series already analysed", extra={"analysis_id": existing.id})
            return
        record = self.store.claim_series(key.study_instance_uid, key.series_instance_uid,
                                         fingerprint, self.owner)
        if record is None:
            log.info("series claimed by another process")
            return
        log.info("series complete", extra={"analysis_id": record.id,
                                           "n_instances": len(files)})
        self._enqueue(record, files, force=True)  # checked: the watcher skips when saturated

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            waited = time.monotonic() - job.enqueued
            metrics.QUEUE_WAIT.observe(waited)
            self._in_flight += 1
            metrics.IN_FLIGHT.inc()
            try:
                record = await loop.run_in_executor(self._executor, self._run, job, waited)
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

    def _run(self, job: _Job, waited_s: float = 0.0) -> Record:
        """One analysis, in a worker thread; every outcome ends up in the store."""
        analysis_token = logs.ANALYSIS_ID.set(job.record.id)
        request_token = logs.REQUEST_ID.set(job.request_id)
        try:
            return self._run_logged(job, waited_s)
        finally:
            logs.REQUEST_ID.reset(request_token)
            logs.ANALYSIS_ID.reset(analysis_token)

    def _run_logged(self, job: _Job, waited_s: float) -> Record:
        from service.pipeline.analysis import AnalysisRejected
        from service.storage import results  # looked up per call: tests replace write_outputs

        record = job.record
        started = time.perf_counter()
        timings: dict[str, float] = {}
        prediction: str | None = None
        conflicts: list[str] = []
        staging: Path | None = None
        writing = False
        try:
            # counted durably before it runs: see MAX_STARTS
            self.store.start(record.id)
            conflicts = self._conflict_warnings(record)
            analysis = self._analyse(job.files, self.engine, rules=self._rules,
                                     accept_non_flair=self.settings.accept_non_flair,
                                     limits=self._limits,
                                     explanation=self.settings.explanation)
            writing = True
            # Written aside and renamed into place, then marked done: a crash at any point
            # leaves no half result visible, and the analysis runs again after the restart.
            staging = self.spool.staging_folder(record.id)
            results.write_outputs(analysis, staging)
            result = analysis.to_json()
            result.update({"analysis_id": record.id, "status": str(Status.DONE)})
            # ids only: the API makes the URLs of the outputs (service.api.analyses.view)
            result["warnings"] = [*result.get("warnings", []), *conflicts]
            results.ResultFolder(staging).write_result(result)
            self.spool.publish_result(staging, record.id)
            staging = None  # it is the result folder now
        except AnalysisRejected as rejected:
            # the client sees its own parts and instances, never a path on this server
            problem = {"code": rejected.code,
                       "detail": client_text(rejected.message, job.files, self.spool.root),
                       "warnings": [*(client_text(str(w), job.files, self.spool.root)
                                      for w in getattr(rejected, "warnings", ())),
                                    *conflicts]}
            final, recorded = self._finish(record, Status.REJECTED, problem=problem)
            outcome = f"rejected:{rejected.code}"
        except Exception as error:
            # first, whatever happens next: a result that was not published never will be
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            log.exception("analysis failed")
            final, recorded = self._finish(record, Status.FAILED,
                                           problem=self._failure(error, job.files, writing))
            outcome = "failed"
        else:
            final, recorded = self._finish(
                record, Status.DONE, result=result,
                study_instance_uid=analysis.study_instance_uid,
                series_instance_uid=analysis.series_instance_uid)
            outcome, prediction, timings = "ok", analysis.prediction, analysis.timings_ms
            metrics.PREDICTIONS.labels(**{"class": prediction}).inc()
            for stage, ms in timings.items():
                metrics.STAGE_DURATION.labels(stage=stage).observe(ms / 1000)
        metrics.SERIES_ANALYSED.labels(outcome=outcome).inc()
        # ids, outcome, class and timings only: never UIDs or other DICOM values
        log.info("analysis finished", extra={
            "source": record.source, "outcome": outcome, "prediction": prediction,
            "timings_ms": timings, "queue_wait_ms": round(waited_s * 1000, 1),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
        if recorded:  # else when the orphan sweep has recorded it (the input stays till then)
            self._after_finish(final)
        return final

    def _failure(self, error: Exception, files: list[Path], writing: bool) -> dict[str, Any]:
        """The problem of a failed analysis: why, in words the client can have."""
        detail = client_text(f"{type(error).__name__}: {error}", files, self.spool.root)
        if _disk_full(error):
            return {"code": Code.SPOOL_FULL, "detail": f"no space left in the spool: {detail}"}
        if writing and isinstance(error, OSError):
            return {"code": Code.RESULT_WRITE_FAILED, "detail": detail}
        return {"code": Code.ANALYSIS_FAILED, "detail": detail}

    def _finish(self, record: Record, status: Status, **fields: Any) -> tuple[Record, bool]:
        """Record how an analysis ended; the record, and whether the database took it. When
        it did not (full, busy), the outcome waits in memory for :meth:`_record_late`: the
        row stays ``running`` under this live process, so nobody else runs it meanwhile,
        and a restart runs it again."""
        try:
            self.store.update(record.id, status, **fields)
        except Exception:
            log.exception("cannot record how an analysis ended; retried by the orphan sweep")
            with self._unrecorded_lock:
                self._unrecorded[record.id] = _Unrecorded(record, status, fields)
            return self._ended(record, status, fields), False
        return self._ended(record, status, fields, stored=True), True

    def _ended(self, record: Record, status: Status, fields: dict[str, Any],
               stored: bool = False) -> Record:
        if stored:
            with contextlib.suppress(Exception):  # recorded; reading it back is a nicety
                final = self.store.get(record.id)
                if final is not None and final.status in FINISHED:
                    return final
        return dataclasses.replace(
            record, status=status, updated=time.time(),
            result=fields.get("result") or record.result,
            problem=fields.get("problem") or record.problem,
            study_instance_uid=fields.get("study_instance_uid") or record.study_instance_uid,
            series_instance_uid=fields.get("series_instance_uid") or record.series_instance_uid)

    def _record_late(self) -> int:
        """Write the outcomes the database refused before; how many it took now."""
        with self._unrecorded_lock:
            waiting = list(self._unrecorded.values())
        recorded = 0
        for item in waiting:
            try:
                self.store.update(item.record.id, item.status, **item.fields)
            except Exception as error:
                log.warning("still cannot record how an analysis ended", extra={
                    "analysis_id": item.record.id, "error": type(error).__name__})
                continue
            with self._unrecorded_lock:
                self._unrecorded.pop(item.record.id, None)
            recorded += 1
            log.info("how an analysis ended is recorded now", extra={
                "analysis_id": item.record.id, "status": str(item.status)})
            self._after_finish(self._ended(item.record, item.status, item.fields, stored=True))
        return recorded

    def _after_finish(self, final: Record) -> None:
        """Once the outcome is in the store: deliveries, the upload's input, the audit."""
        if final.status is Status.DONE:
            for hook in self.result_hooks:
                try:
                    hook(final.id)
                except Exception:  # a hook must not turn a finished analysis into a failure
                    log.exception("result hook failed")
        if final.source == "upload":
            self.spool.remove_upload(final.id)
        self._audit_finished(final)

    def _conflict_warnings(self, record: Record) -> list[str]:
        """A series that was also sent with different content under known SOP Instance UIDs
        (refused, first copies kept) says so in its analysis."""
        if record.source == "upload" or not (record.study_instance_uid
                                             and record.series_instance_uid):
            return []
        try:
            refused = self.spool.conflicts(SeriesKey(record.study_instance_uid,
                                                     record.series_instance_uid))
        except ValueError:
            return []
        if not refused:
            return []
        return [f"conflicting_duplicate: {len(refused)} instance(s) were sent again with "
                "different content under a known SOP Instance UID and refused; the first "
                "copies were analysed"]

    def _audit_finished(self, record: Record) -> None:
        outputs = (record.result or {}).get("outputs", {})
        self._audit.write(
            "analysis", analysis_id=record.id, source=record.source, status=str(record.status),
            study_instance_uid=record.study_instance_uid,
            series_instance_uid=record.series_instance_uid,
            prediction=(record.result or {}).get("prediction"),
            problem=(record.problem or {}).get("code"),
            sc_series_instance_uid=outputs.get("secondary_capture_series_instance_uid"),
            sr_sop_instance_uid=outputs.get("sr_sop_instance_uid"))
