"""One queued analysis, run and recorded: the pipeline's :class:`Runner` bound to storage.

:class:`Runs` counts each start in the store before the run (see
:data:`service.runtime.orphans.MAX_STARTS`), lets the runner write the result through the spool
(:class:`SpoolResults`: staging folder, :func:`service.storage.results.write_outputs`,
publish), and records how it ended: ``done``, ``rejected`` or ``failed`` with a reason code.
When the database refuses that write (full, busy), the outcome waits in memory until
:meth:`Runs.record_late` (the orphan sweep) writes it. Once recorded: the result hooks (PACS
deliveries), the upload's input goes, and the audit trail has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.pipeline.runner import Runner
from service.runtime import logs, metrics
from service.runtime.audit import AuditLog, audit_finished
from service.storage.spool import SeriesKey, Spool
from service.storage.store import FINISHED, AnalysisStore, Record, Status

if TYPE_CHECKING:
    import asyncio

    from service.pipeline.analysis import Analysis

# the analyses' log lines keep the logger they have always had
log = logging.getLogger("service.runtime.scheduler")


@dataclass
class Job:
    """One analysis in the queue."""

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


class SpoolResults:
    """The runner's :class:`~service.pipeline.runner.ResultWriter` over the spool."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def staging_folder(self, analysis_id: str) -> Path:
        return self.spool.staging_folder(analysis_id)

    def write_outputs(self, analysis: Analysis, folder: Path) -> None:
        from service.storage import results  # looked up per call: tests replace write_outputs

        results.write_outputs(analysis, folder)

    def write_result(self, folder: Path, result: dict[str, Any]) -> None:
        from service.storage import results

        results.ResultFolder(folder).write_result(result)

    def publish(self, folder: Path, analysis_id: str) -> None:
        self.spool.publish_result(folder, analysis_id)


class Runs:
    """Runs jobs (in worker threads) and records their outcomes."""

    def __init__(self, runner: Runner, spool: Spool, store: AnalysisStore,
                 audit: AuditLog) -> None:
        self.runner, self.spool, self.store, self.audit = runner, spool, store, audit
        # called with the id of every analysis that ends DONE, in its worker thread (results
        # sent to the PACS: service/runtime/pacs.py)
        self.result_hooks: list[Callable[[str], None]] = []
        # outcomes the database refused (disk full, busy): the orphan sweep writes them
        self._unrecorded: dict[str, _Unrecorded] = {}
        self._unrecorded_lock = threading.Lock()

    @property
    def unrecorded(self) -> bool:
        return bool(self._unrecorded)

    def run(self, job: Job, waited_s: float = 0.0) -> Record:
        """One analysis, in a worker thread; every outcome ends up in the store."""
        analysis_token = logs.ANALYSIS_ID.set(job.record.id)
        request_token = logs.REQUEST_ID.set(job.request_id)
        try:
            return self._run_logged(job, waited_s)
        finally:
            logs.REQUEST_ID.reset(request_token)
            logs.ANALYSIS_ID.reset(analysis_token)

    def _run_logged(self, job: Job, waited_s: float) -> Record:
        record = job.record
        started = time.perf_counter()

        def begin() -> list[str]:
            self.store.start(record.id)  # counted durably before it runs: see MAX_STARTS
            return self.conflict_warnings(record)

        outcome = self.runner.run(record.id, job.files, begin)
        if outcome.error is not None:
            log.error("analysis failed", exc_info=outcome.error)
        if outcome.status == "done":
            final, recorded = self.finish(
                record, Status.DONE, result=outcome.result,
                study_instance_uid=outcome.study_instance_uid,
                series_instance_uid=outcome.series_instance_uid)
            metrics.PREDICTIONS.labels(**{"class": outcome.prediction}).inc()
            for stage, ms in outcome.timings_ms.items():
                metrics.STAGE_DURATION.labels(stage=stage).observe(ms / 1000)
        else:
            final, recorded = self.finish(record, Status(outcome.status),
                                          problem=outcome.problem)
        metrics.SERIES_ANALYSED.labels(outcome=outcome.label).inc()
        # ids, outcome, class and timings only: never UIDs or other DICOM values
        log.info("analysis finished", extra={
            "source": record.source, "outcome": outcome.label,
            "prediction": outcome.prediction, "timings_ms": outcome.timings_ms,
            "queue_wait_ms": round(waited_s * 1000, 1),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
        if recorded:  # else when the orphan sweep has recorded it (the input stays till then)
            self.after_finish(final)
        return final

    def finish(self, record: Record, status: Status, **fields: Any) -> tuple[Record, bool]:
        """Record how an analysis ended; the record, and whether the database took it. When
        it did not (full, busy), the outcome waits in memory for :meth:`record_late`: the
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

    def record_late(self) -> int:
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
            self.after_finish(self._ended(item.record, item.status, item.fields, stored=True))
        return recorded

    def after_finish(self, final: Record) -> None:
        """Once the outcome is in the store: deliveries, the upload's input, the audit."""
        if final.status is Status.DONE:
            for hook in self.result_hooks:
                try:
                    hook(final.id)
                except Exception:  # a hook must not turn a finished analysis into a failure
                    log.exception("result hook failed")
        if final.source == "upload":
            self.spool.remove_upload(final.id)
        audit_finished(self.audit, final)

    def conflict_warnings(self, record: Record) -> list[str]:
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
