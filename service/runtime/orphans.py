"""Analyses whose process is gone: taken over, or failed for good.

Each process holds a lease (:meth:`Spool.acquire_lease`). An unfinished analysis whose owner
holds none any more is taken over (compare-and-set in the store: by one process only), its
half-written staging folder removed, and queued again, or failed ``input_lost`` when its
spooled input is gone. One started :data:`MAX_STARTS` times without finishing killed its
process each time (out of memory, say) and fails ``crashed_twice`` instead. The sweep
(:meth:`Orphans.sweep_forever`) also writes the outcomes the database refused before
(:meth:`service.runtime.runs.Runs.record_late`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from service.core.codes import Code
from service.runtime import metrics
from service.runtime.runs import Runs
from service.storage.spool import SeriesKey, Spool
from service.storage.store import AnalysisStore, Record, Status

# the analyses' log lines keep the logger they have always had
log = logging.getLogger("service.runtime.scheduler")

# An analysis started this often without finishing killed its process each time (the OOM
# killer, say): resuming it again would crash-loop the service.
MAX_STARTS = 2


class Orphans:
    def __init__(self, spool: Spool, store: AnalysisStore, owner: str, runs: Runs,
                 enqueue: Callable[[Record, list[Path]], object]) -> None:
        self.spool, self.store, self.owner, self.runs = spool, store, owner, runs
        self._enqueue = enqueue  # into the queue, past its bound (accepted before)

    def take_over(self) -> int:
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
            self.spool.result_folders.remove_staging(record.id)  # what its dead owner wrote
            if record.attempts >= MAX_STARTS:
                self.give_up(record)
                continue
            files = self.files_of(record)
            if files:
                self._enqueue(record, files)
                log.info("analysis taken over from a process that is gone",
                         extra={"analysis_id": record.id, "attempts": record.attempts})
            else:
                self.runs.finish(record, Status.FAILED, problem={
                    "code": Code.INPUT_LOST, "detail": "the spooled input is gone"})
        return taken

    def files_of(self, record: Record) -> list[Path]:
        if record.source == "upload":
            return sorted(self.spool.upload_folder(record.id).glob("*.dcm"))
        if record.study_instance_uid and record.series_instance_uid:
            return self.spool.series_files(
                SeriesKey(record.study_instance_uid, record.series_instance_uid))
        return []

    def give_up(self, record: Record) -> None:
        """An analysis that killed its process every time it ran fails for good."""
        log.error("analysis ended its process each time it ran: failed, not resumed",
                  extra={"analysis_id": record.id, "attempts": record.attempts})
        metrics.SERIES_ANALYSED.labels(outcome="failed").inc()
        final, recorded = self.runs.finish(record, Status.FAILED, problem={
            "code": Code.CRASHED_TWICE,
            "detail": f"the service process ended while running this analysis "
                      f"{record.attempts} times (out of memory, say); it is not tried again"})
        if recorded:
            self.runs.after_finish(final)

    async def sweep_forever(self, interval_s: float, draining: Callable[[], bool]) -> None:
        """Every ``interval_s``: record the late outcomes, then (unless draining) take over."""
        while True:
            await asyncio.sleep(interval_s)
            if self.runs.unrecorded:  # also while draining: these analyses have ended
                try:
                    await asyncio.to_thread(self.runs.record_late)
                except Exception:
                    log.exception("cannot record the outcomes of ended analyses")
            if draining():
                continue
            try:
                self.take_over()
            except Exception:  # the database busy for 30 s, say: try again next time
                log.exception("orphan sweep failed")
