"""Retention's deletion primitives: what one expired analysis leaves on disk and in the
database, and deleting it in the order that survives a crash at any step. The sweep that
decides what has expired, and records it in the audit trail, is
:mod:`service.runtime.retention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.storage.spool import SeriesKey, Spool
from service.storage.store import Record

if TYPE_CHECKING:
    from service.storage import AnalysisRepository


def input_series(spool: Spool, record: Record) -> SeriesKey | None:
    """The spooled STOW-RS / C-STORE series an analysis was made of, if its UIDs are valid
    path components (an upload's input is its upload folder instead: None)."""
    if record.source == "upload" or not record.study_instance_uid or \
            not record.series_instance_uid:
        return None
    try:
        key = SeriesKey(record.study_instance_uid, record.series_instance_uid)
        spool.series_folder(key)  # validates the UIDs
    except ValueError:
        return None
    return key


def forget(spool: Spool, store: AnalysisRepository, record: Record,
           key: SeriesKey | None) -> bool:
    """Delete an analysis: its results, its input (upload folder, or the series ``key`` when
    given), then its database and delivery rows; last, so that a crash in between leaves a
    row that the next sweep deletes again rather than files nobody knows of. Every step
    tolerates that another process deleted the thing first. Whether a series was deleted."""
    spool.remove_result(record.id)
    spool.remove_upload(record.id)
    removed_series = False
    if key is not None and spool.series_folder(key).exists():
        spool.remove_series(key)
        removed_series = True
    store.delete(record.id)
    return removed_series
