"""Analyses and their results, in SQLite (WAL): survives restarts, one writer at a time.

The row holds what ``GET /v1/analyses/{id}`` returns; the DICOM outputs themselves live in the
spool's ``results/<id>/`` folder (:mod:`service.storage.results`). The database file, its
pragmas and schema are :mod:`service.storage.sqlite`'s.

Several server processes share one database (``flaircad serve --workers N``). Each row names
its ``owner``, the lease token of the process that queued it (:meth:`service.storage.spool.Spool.
acquire_lease`); a STOW-RS series is claimed for analysis in one transaction that holds
SQLite's write lock (:meth:`AnalysisStore.claim_series`), so two processes that both see the
series complete cannot both analyse it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from service.storage import deliveries
from service.storage.sqlite import connect


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"


FINISHED = (Status.DONE, Status.REJECTED, Status.FAILED)

# explicit, so that a database whose owner or attempts column was added later reads the same
_COLUMNS = ("id, status, source, study_instance_uid, series_instance_uid, fingerprint, created, "
            "updated, result, problem, owner, attempts")


@dataclass(frozen=True)
class Record:
    id: str
    status: Status
    source: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    fingerprint: str | None
    created: float
    updated: float
    result: dict[str, Any] | None
    problem: dict[str, Any] | None
    owner: str | None = None
    attempts: int = 0  # how often a run of it started (:meth:`AnalysisStore.start`)


class AnalysisStore:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = connect(path)  # schema and migrations: service.storage.sqlite

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, source: str, study_instance_uid: str | None = None,
               series_instance_uid: str | None = None, fingerprint: str | None = None,
               owner: str | None = None) -> Record:
        analysis_id = uuid.uuid4().hex
        with self._lock:
            self._insert(analysis_id, source, study_instance_uid, series_instance_uid,
                         fingerprint, owner)
        record = self.get(analysis_id)
        assert record is not None
        return record

    def _insert(self, analysis_id: str, source: str, study_instance_uid: str | None,
                series_instance_uid: str | None, fingerprint: str | None,
                owner: str | None) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO analyses (id, status, source, study_instance_uid, series_instance_uid, "
            "fingerprint, created, updated, owner) VALUES (?,?,?,?,?,?,?,?,?)",
            (analysis_id, Status.QUEUED, source, study_instance_uid, series_instance_uid,
             fingerprint, now, now, owner))

    def claim_series(self, study_instance_uid: str, series_instance_uid: str, fingerprint: str,
                     owner: str) -> Record | None:
        """A new queued analysis of this STOW-RS series content for ``owner``, or None when
        one that did not fail exists already. Atomic across processes: BEGIN IMMEDIATE takes
        the database's write lock before the look-up."""
        analysis_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                taken = self._db.execute(
                    "SELECT 1 FROM analyses WHERE series_instance_uid=? AND fingerprint=? "
                    "AND status != ? LIMIT 1",
                    (series_instance_uid, fingerprint, Status.FAILED)).fetchone()
                if taken is None:
                    self._insert(analysis_id, "stow", study_instance_uid, series_instance_uid,
                                 fingerprint, owner)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if taken is not None else self.get(analysis_id)

    def claim_upload(self, fingerprint: str, owner: str) -> tuple[Record, bool]:
        """The analysis of this upload content: an existing one that did not fail (False),
        or a new queued one for ``owner`` (True). Atomic like :meth:`claim_series`, so two
        identical uploads at once make one analysis."""
        analysis_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT {_COLUMNS} FROM analyses WHERE source='upload' AND fingerprint=? "
                    "AND status != ? ORDER BY created DESC LIMIT 1",
                    (fingerprint, Status.FAILED)).fetchone()
                if row is None:
                    self._insert(analysis_id, "upload", None, None, fingerprint, owner)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if row is not None:
            return _record(row), False
        record = self.get(analysis_id)
        assert record is not None
        return record, True

    # -- retention (the sweep: service/runtime/retention.py) ------------------------------------
    def expired(self, before: float, limit: int = 500) -> list[Record]:
        """Finished analyses last updated before ``before`` whose results are not still
        waiting to be sent to a PACS (:func:`service.storage.deliveries.undelivered`)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM analyses WHERE status IN (?, ?, ?) AND updated < ?"
                f" AND NOT {deliveries.undelivered('analyses.id')} ORDER BY updated LIMIT ?",
                (*FINISHED, before, limit)).fetchall()
        return [_record(row) for row in rows]

    def series_in_use(self, series_instance_uid: str, before: float,
                      other_than: str) -> bool:
        """Whether another analysis of the series is unfinished or finished after
        ``before``: its spooled instances must stay."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM analyses WHERE series_instance_uid=? AND id != ? AND "
                "(status IN (?, ?) OR updated >= ?) LIMIT 1",
                (series_instance_uid, other_than, Status.QUEUED, Status.RUNNING,
                 before)).fetchone()
        return row is not None

    def delete(self, analysis_id: str) -> None:
        """Forget an analysis (and its delivery rows)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                deliveries.forget(self._db, analysis_id)
                self._db.execute("DELETE FROM analyses WHERE id=?", (analysis_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it: old page copies go with it."""
        with self._lock, contextlib.suppress(sqlite3.OperationalError):  # busy: next time
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def take_over(self, analysis_id: str, previous_owner: str | None, owner: str) -> bool:
        """Make ``owner`` the owner of an unfinished analysis if ``previous_owner`` still is
        (compare-and-set: of several processes only one wins)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE analyses SET owner=?, status=?, updated=? WHERE id=? AND owner IS ? "
                "AND status IN (?, ?)",
                (owner, Status.QUEUED, time.time(), analysis_id, previous_owner, Status.QUEUED,
                 Status.RUNNING))
            return cursor.rowcount == 1

    def start(self, analysis_id: str) -> int:
        """Mark an analysis running and count the start, durably, before it runs: a process
        that dies while running it (out of memory, say) leaves the count behind, so that a
        restart can tell an analysis that keeps killing its process. The new count."""
        with self._lock:
            # fetchall: the statement runs to its end, so the autocommit commits here
            rows = self._db.execute(
                "UPDATE analyses SET status=?, attempts=attempts+1, updated=? WHERE id=? "
                "RETURNING attempts", (Status.RUNNING, time.time(), analysis_id)).fetchall()
        return int(rows[0][0]) if rows else 0

    def update(self, analysis_id: str, status: Status, *, result: dict[str, Any] | None = None,
               problem: dict[str, Any] | None = None, study_instance_uid: str | None = None,
               series_instance_uid: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE analyses SET status=?, updated=?, "
                "result=COALESCE(?, result), problem=COALESCE(?, problem), "
                "study_instance_uid=COALESCE(?, study_instance_uid), "
                "series_instance_uid=COALESCE(?, series_instance_uid) WHERE id=?",
                (status, time.time(), json.dumps(result) if result is not None else None,
                 json.dumps(problem) if problem is not None else None, study_instance_uid,
                 series_instance_uid, analysis_id))

    def get(self, analysis_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM analyses WHERE id=?",
                                   (analysis_id,)).fetchone()
        return _record(row) if row else None

    def by_study(self, study_instance_uid: str) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM analyses WHERE study_instance_uid=? ORDER BY created",
                (study_instance_uid,)).fetchall()
        return [_record(row) for row in rows]

    def recent(self, limit: int = 100) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM analyses ORDER BY created DESC LIMIT ?",
                (limit,)).fetchall()
        return [_record(row) for row in rows]

    def find_series(self, series_instance_uid: str, fingerprint: str) -> Record | None:
        """An analysis of exactly this series content that did not fail, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM analyses WHERE series_instance_uid=? AND fingerprint=? "
                "AND status != ? ORDER BY created DESC LIMIT 1",
                (series_instance_uid, fingerprint, Status.FAILED)).fetchone()
        return _record(row) if row else None

    def unfinished(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM analyses WHERE status IN (?, ?) ORDER BY created",
                (Status.QUEUED, Status.RUNNING)).fetchall()
        return [_record(row) for row in rows]


def _record(row: tuple[Any, ...]) -> Record:
    (analysis_id, status, source, study, series, fingerprint, created, updated, result,
     problem, owner, attempts) = row
    return Record(analysis_id, Status(status), source, study, series, fingerprint, created,
                  updated, json.loads(result) if result else None,
                  json.loads(problem) if problem else None, owner, int(attempts or 0))
