"""Retention: patient data does not linger.

A finished analysis (done, rejected or failed) expires ``FLAIRCAD_RETENTION_HOURS`` after it
finished (0: never). The sweep, run by every server process every
``FLAIRCAD_RETENTION_SWEEP_INTERVAL_S``, deletes for each expired analysis, in this order:

1. its results (``results/<id>``: SC series, SR, preview, result.json);
2. its input: the upload folder, or the spooled STOW-RS/C-STORE series, once nothing else
   needs that series (no other analysis of it unfinished or younger than the retention, no
   instance received for the retention period, not waiting in this process' stability
   window). While the series must stay, the analysis stays too, and is tried again at the
   next sweep: a series folder without its analysis would be analysed again at the next
   start;
3. its database row and its delivery rows (SQLite ``secure_delete`` overwrites them; the WAL is
   checkpointed and truncated after each sweep that deleted something).

Each server process sweeps in :func:`sweep_forever` (started by the scheduler); the first sweep
runs at start, which also clears what a crash left behind. The deleting itself is
:mod:`service.storage.retention`'s (this module decides what and when, and audits it). Results
still waiting to be sent to a PACS (deliveries pending or in progress) are kept until they are
sent or given up. The sweep also removes what crashed writers left behind: staging folders of
results and request bodies in ``tmp/`` untouched for an hour. Each deletion is recorded in the
audit trail (event ``retention``). Several processes may sweep at once: every step tolerates
that the thing is already gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from service.core.config import Settings
from service.runtime.audit import AuditLog
from service.storage import AnalysisRepository
from service.storage import retention as storage_retention
from service.storage.spool import SeriesKey, Spool

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0  # a request body or staged result untouched this long is abandoned


@dataclass
class SweepReport:
    analyses: list[str] = field(default_factory=list)  # ids deleted
    series: int = 0  # spooled series deleted
    kept_for_input: int = 0  # expired, but their series is still in use
    stale: int = 0  # crashed writers' leftovers removed


def sweep(settings: Settings, spool: Spool, store: AnalysisRepository, *, now: float | None = None,
          busy: Collection[SeriesKey] = (), audit: AuditLog | None = None) -> SweepReport:
    report = SweepReport()
    report.stale = spool.remove_stale(STALE_AFTER_S)
    if settings.retention_hours <= 0:
        return report
    now = time.time() if now is None else now
    retention_s = settings.retention_hours * 3600
    cutoff = now - retention_s
    for record in store.expired(cutoff):
        key = storage_retention.input_series(spool, record)
        if key is not None and spool.series_files(key):
            age = spool.series_age_s(key)
            in_use = (key in busy or (age is not None and age < retention_s)
                      or store.series_in_use(key.series_instance_uid, cutoff, record.id))
            if in_use:
                report.kept_for_input += 1
                continue
        if storage_retention.forget(spool, store, record, key):
            report.series += 1
        report.analyses.append(record.id)
        if audit is not None:
            outputs = (record.result or {}).get("outputs", {})
            audit.write("retention", analysis_id=record.id, source=record.source,
                        status=str(record.status),
                        study_instance_uid=record.study_instance_uid,
                        series_instance_uid=record.series_instance_uid,
                        sc_series_instance_uid=outputs.get(
                            "secondary_capture_series_instance_uid"),
                        sr_sop_instance_uid=outputs.get("sr_sop_instance_uid"))
    if report.analyses:
        store.checkpoint()
        log.info("retention sweep", extra={"analyses_deleted": len(report.analyses),
                                           "series_deleted": report.series,
                                           "kept_for_input": report.kept_for_input})
    return report


async def sweep_forever(settings: Settings, spool: Spool, store: AnalysisRepository, *,
                        busy: Callable[[], Collection[SeriesKey]],
                        audit: AuditLog | None = None) -> None:
    """:func:`sweep` now and every ``retention_sweep_interval_s``, in a thread; ``busy``: the
    series in this process' stability window, asked each time."""
    while True:
        try:
            await asyncio.to_thread(sweep, settings, spool, store, busy=busy(), audit=audit)
        except Exception:  # the database busy, a file system hiccup: next time
            log.exception("retention sweep failed")
        await asyncio.sleep(settings.retention_sweep_interval_s)
