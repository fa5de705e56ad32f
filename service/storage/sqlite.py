"""The one SQLite setup: the spool database's file name, its pragmas and its schema.

Every table lives in one file, ``<spool>/flaircad.sqlite`` (:data:`DATABASE`), shared by every
process of one spool. :func:`connect` opens it as every table needs it (WAL, durable commits,
``secure_delete`` for retention) and creates or migrates both tables (``analyses``:
:mod:`service.storage.store`; ``deliveries``: :mod:`service.storage.deliveries`), so each store
may rely on the other's table being there. Nothing outside :mod:`service.storage` spells the
file name or writes SQL.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

DATABASE = "flaircad.sqlite"

ANALYSES_SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    study_instance_uid TEXT,
    series_instance_uid TEXT,
    fingerprint TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    result TEXT,
    problem TEXT,
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS analyses_study ON analyses (study_instance_uid);
CREATE INDEX IF NOT EXISTS analyses_series ON analyses (series_instance_uid, fingerprint);
"""
# columns added to ``analyses`` after the first release, for databases made before them
ANALYSES_ADDED_COLUMNS = {"owner": "owner TEXT",
                          "attempts": "attempts INTEGER NOT NULL DEFAULT 0"}

DELIVERIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    analysis_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    instances INTEGER,
    owner TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (analysis_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt);
"""


def database_path(spool_dir: Path) -> Path:
    """Where a spool keeps its database."""
    return spool_dir / DATABASE


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the spool database as every table in it needs it: WAL, durable commits,
    and deleted rows (retention) overwritten rather than left readable in free pages; both
    tables created, and migrated if an older release made them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # other processes may hold the write lock for a moment: wait rather than fail
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA secure_delete=ON")
    db.executescript(ANALYSES_SCHEMA + DELIVERIES_SCHEMA)
    _migrate(db)
    return db


def _migrate(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(analyses)")}
    for name, definition in ANALYSES_ADDED_COLUMNS.items():
        if name not in columns:  # a database from before leases or start counts
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                db.execute(f"ALTER TABLE analyses ADD COLUMN {definition}")
