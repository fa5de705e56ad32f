"""Result deliveries in the spool database: table ``deliveries``, one row per analysis and
destination (states and the loop that sends them: :mod:`service.runtime.forward`).

This module is the only one that writes SQL on the table; the analysis store's retention
queries (:mod:`service.storage.store`) take the two pieces they need from here
(:func:`undelivered`, :func:`forget`), so that an analysis and its delivery rows go in one
transaction and a result still to be sent is never expired.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from service.core.destinations import Destination
from service.storage.sqlite import connect


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


_COLUMNS = ("analysis_id, destination, kind, state, attempts, next_attempt, last_error, "
            "instances, owner, created, updated")


@dataclass(frozen=True)
class Delivery:
    analysis_id: str
    destination: str
    kind: str
    state: DeliveryState
    attempts: int
    next_attempt: float
    last_error: str | None
    instances: int | None
    owner: str | None
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        """What ``GET /v1/analyses/{id}`` shows (no owner token, times as epoch seconds)."""
        return {"destination": self.destination, "kind": self.kind, "state": str(self.state),
                "attempts": self.attempts, "last_error": self.last_error,
                "instances": self.instances, "updated": self.updated,
                "next_attempt": (self.next_attempt if self.state is DeliveryState.PENDING
                                 else None)}


class DeliveryStore:
    """The ``deliveries`` table in the spool's SQLite database (its own connection)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = connect(path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def plan(self, analysis_id: str, destinations: Iterable[Destination],
             now: float | None = None) -> int:
        """One pending row per destination (none if it exists already); how many were new."""
        now = time.time() if now is None else now
        added = 0
        with self._lock:
            for destination in destinations:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO deliveries (analysis_id, destination, kind, state, "
                    "next_attempt, created, updated) VALUES (?,?,?,?,?,?,?)",
                    (analysis_id, destination.name, destination.kind, DeliveryState.PENDING,
                     now, now, now))
                added += cursor.rowcount
        return added

    def plan_missing(self, destinations: Iterable[Destination], now: float | None = None
                     ) -> int:
        """A pending row for every done analysis and destination that has none (a crash
        between "done" and :meth:`plan`, or a destination added since); how many were new."""
        now = time.time() if now is None else now
        added = 0
        with self._lock:
            for destination in destinations:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO deliveries (analysis_id, destination, kind, state, "
                    "next_attempt, created, updated) SELECT a.id, ?, ?, ?, ?, ?, ? FROM "
                    "analyses a WHERE a.status='done' AND NOT EXISTS (SELECT 1 FROM "
                    "deliveries d WHERE d.analysis_id=a.id AND d.destination=?)",
                    (destination.name, destination.kind, DeliveryState.PENDING, now, now, now,
                     destination.name))
                added += cursor.rowcount
        return added

    def claim_due(self, names: Iterable[str], owner: str, now: float | None = None,
                  limit: int = 8) -> list[Delivery]:
        """Pending rows of these destinations whose time has come, now ``sending`` for
        ``owner`` (compare-and-set: a row another process claimed first is skipped)."""
        now = time.time() if now is None else now
        names = list(names)
        if not names:
            return []
        marks = ",".join("?" * len(names))
        claimed: list[Delivery] = []
        with self._lock:
            rows = self._db.execute(
                f"SELECT analysis_id, destination FROM deliveries WHERE state=? AND "
                f"next_attempt<=? AND destination IN ({marks}) ORDER BY next_attempt LIMIT ?",
                (DeliveryState.PENDING, now, *names, limit)).fetchall()
            for analysis_id, destination in rows:
                cursor = self._db.execute(
                    "UPDATE deliveries SET state=?, owner=?, updated=? WHERE analysis_id=? AND "
                    "destination=? AND state=?",
                    (DeliveryState.SENDING, owner, now, analysis_id, destination,
                     DeliveryState.PENDING))
                if cursor.rowcount == 1:
                    claimed.append(self._get(analysis_id, destination))
        return claimed

    def record(self, analysis_id: str, destination: str, state: DeliveryState, *,
               attempts: int, next_attempt: float | None = None, error: str | None = None,
               instances: int | None = None) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET state=?, attempts=?, next_attempt=COALESCE(?, "
                "next_attempt), last_error=?, instances=COALESCE(?, instances), owner=NULL, "
                "updated=? WHERE analysis_id=? AND destination=?",
                (state, attempts, next_attempt, error, instances, now, analysis_id,
                 destination))

    def release(self, owner_alive: Callable[[str | None], bool]) -> int:
        """``sending`` rows whose owner process is gone go back to ``pending`` (now)."""
        released = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT analysis_id, destination, owner FROM deliveries WHERE state=?",
                (DeliveryState.SENDING,)).fetchall()
        for analysis_id, destination, owner in rows:
            if owner_alive(owner):
                continue
            with self._lock:
                cursor = self._db.execute(
                    "UPDATE deliveries SET state=?, owner=NULL, next_attempt=?, updated=? "
                    "WHERE analysis_id=? AND destination=? AND state=? AND owner IS ?",
                    (DeliveryState.PENDING, time.time(), time.time(), analysis_id,
                     destination, DeliveryState.SENDING, owner))
                released += cursor.rowcount
        return released

    def next_due(self, names: Iterable[str]) -> float | None:
        names = list(names)
        if not names:
            return None
        marks = ",".join("?" * len(names))
        with self._lock:
            (value,) = self._db.execute(
                f"SELECT MIN(next_attempt) FROM deliveries WHERE state=? AND destination IN "
                f"({marks})", (DeliveryState.PENDING, *names)).fetchone()
        return float(value) if value is not None else None

    def of_analysis(self, analysis_id: str) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE analysis_id=? ORDER BY destination",
                (analysis_id,)).fetchall()
        return [_delivery(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """(destination, state) → rows."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, "
                "state").fetchall()
        return {(destination, state): int(n) for destination, state, n in rows}

    def _get(self, analysis_id: str, destination: str) -> Delivery:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM deliveries WHERE analysis_id=? AND destination=?",
            (analysis_id, destination)).fetchone()
        return _delivery(row)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    (analysis_id, destination, kind, state, attempts, next_attempt, last_error, instances,
     owner, created, updated) = row
    return Delivery(analysis_id, destination, kind, DeliveryState(state), int(attempts),
                    float(next_attempt), last_error, instances, owner, created, updated)


# -- what retention (service.storage.store) needs of the table ---------------------------------
def undelivered(analysis_id_column: str) -> str:
    """An SQL condition: the analysis whose id is in ``analysis_id_column`` has results still
    waiting to be sent (a delivery pending or in progress)."""
    return (f"EXISTS (SELECT 1 FROM deliveries d WHERE d.analysis_id = {analysis_id_column} "
            f"AND d.state IN ('{DeliveryState.PENDING}', '{DeliveryState.SENDING}'))")


def forget(db: sqlite3.Connection, analysis_id: str) -> None:
    """Delete an analysis' delivery rows (inside the caller's transaction)."""
    db.execute("DELETE FROM deliveries WHERE analysis_id=?", (analysis_id,))
