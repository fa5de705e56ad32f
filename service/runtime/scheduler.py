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

This module is the queue, the window and the lease (with start, drain and stop). The rest
lives beside it: the run of one analysis and how it is recorded in :mod:`service.runtime.runs`
(over :mod:`service.pipeline.runner`: every accepted analysis ends ``done``, ``rejected`` or
``failed`` with a reason code), taking over the analyses of dead processes and
:data:`MAX_STARTS` in :mod:`service.runtime.orphans`, the retention loop in
:mod:`service.runtime.retention`, the ``analysis`` audit event in :mod:`service.runtime.audit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.codes import Code
from service.core.config import Settings
from service.core.limits import Limits
from service.pipeline.engine import Engine
from service.pipeline.runner import Analyse, Runner
from service.runtime import logs, metrics, retention
from service.runtime.arrivals import ArrivalWindow, Hold
from service.runtime.audit import trail
from service.runtime.orphans import MAX_STARTS, Orphans
from service.runtime.runs import Job, Runs, SpoolResults
from service.storage.spool import SeriesKey, Spool
from service.storage.store import AnalysisStore, Record

if TYPE_CHECKING:
    from service.core.flair import RuleSet

__all__ = ["MAX_STARTS", "Analyse", "Draining", "Saturated", "Scheduler", "SpoolFull",
           "TooManyOpenSeries"]

log = logging.getLogger(__name__)


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


class Scheduler:
    def __init__(self, settings: Settings, engine: Engine, spool: Spool, store: AnalysisStore,
                 analyse: Analyse | None = None) -> None:
        self.settings, self.engine, self.spool, self.store = settings, engine, spool, store
        if analyse is None:
            from service.pipeline.analysis import analyse as default_analyse
            analyse = default_analyse
        # Unbounded underneath: the bound is enforced on new work only, so that restart recovery
        # can re-queue everything that was accepted before.
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
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
        self._audit = trail(settings)
        rules: RuleSet | None = None
        if settings.flair_rules is not None:
            from service.core.flair import load_rules
            rules = load_rules(settings.flair_rules)
        runner = Runner(analyse, engine, SpoolResults(spool), spool.root, rules=rules,
                        accept_non_flair=settings.accept_non_flair, limits=Limits.of(settings),
                        explanation=settings.explanation, outputs=settings.outputs)
        self.runs = Runs(runner, spool, store, self._audit)
        self.orphans = Orphans(spool, store, self.owner, self.runs,
                               lambda record, files: self._enqueue(record, files, force=True))

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def owner(self) -> str:
        return self._lease.token

    @property
    def result_hooks(self) -> list[Callable[[str], None]]:
        """Called with the id of every analysis that ends DONE, in its worker thread (results
        sent to the PACS: service/runtime/pacs.py)."""
        return self.runs.result_hooks

    async def start(self) -> None:
        self.orphans.take_over()
        now = time.monotonic()
        for key in self.spool.pending_series():
            self._arriving.setdefault(key, now)
        metrics.SERIES_ARRIVING.set(len(self._arriving))
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._watch_stable_series()))
        self._tasks.append(asyncio.create_task(self.orphans.sweep_forever(
            self.settings.orphan_sweep_interval_s, lambda: self._draining)))
        self._tasks.append(asyncio.create_task(retention.sweep_forever(
            self.settings, self.spool, self.store, busy=self.arrivals.keys, audit=self._audit)))

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
    def _enqueue(self, record: Record, files: list[Path], force: bool = False
                 ) -> asyncio.Future[Record]:
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        job = Job(record, files, future, time.monotonic(), logs.REQUEST_ID.get())
        if not force:
            self.check_capacity()
        self._queue.put_nowait(job)
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        log.info("analysis queued", extra={"analysis_id": record.id, "source": record.source,
                                           "queue_depth": self._queue.qsize()})
        return future

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
                record = await loop.run_in_executor(self._executor, self.runs.run, job, waited)
            except Exception as error:  # runs record their own failures; this is a last resort
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
