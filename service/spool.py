"""The spool: every accepted DICOM instance on disk before anyone is told it was stored.

Layout under the spool root::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   (STOW-RS, C-STORE)
    uploads/<analysis id>/<n>.dcm                                          (/v1/analyses)
    results/<analysis id>/…                                                (SC, SR, preview)
    owners/<process token>.lock                  (held by each live server process: leases)

Writes go to a temporary file in the target folder, are fsync'd and renamed into place, and the
folder is fsync'd: after a crash a file is either complete or absent. UIDs become path
components only after validation (:func:`safe_uid`), so a hostile UID cannot escape the spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: acknowledged, nothing new
    CONFLICT = "conflict"  # same UID, different bytes: refused, the first copy kept


def safe_uid(uid: str) -> str:
    """``uid`` if it is a syntactically valid DICOM UID (digits and dots, ≤ 64 characters)."""
    uid = uid.strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise ValueError(f"not a valid DICOM UID: {uid[:80]!r}")
    return uid


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SeriesKey:
    study_instance_uid: str
    series_instance_uid: str


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.uploads = root / "uploads"
        self.results = root / "results"
        self.owners = root / "owners"
        for folder in (self.incoming, self.uploads, self.results, self.owners):
            folder.mkdir(parents=True, exist_ok=True)

    def instance_path(self, key: SeriesKey, sop_instance_uid: str) -> Path:
        return (self.incoming / safe_uid(key.study_instance_uid)
                / safe_uid(key.series_instance_uid) / f"{safe_uid(sop_instance_uid)}.dcm")

    def store_instance(self, key: SeriesKey, sop_instance_uid: str, data: bytes) -> StoreOutcome:
        path = self.instance_path(key, sop_instance_uid)
        if path.exists():
            same = digest(path.read_bytes()) == digest(data)
            return StoreOutcome.DUPLICATE if same else StoreOutcome.CONFLICT
        write_atomically(path, data)
        return StoreOutcome.STORED

    def series_age_s(self, key: SeriesKey) -> float | None:
        """Seconds since an instance was last written into the series' folder (any process:
        the folder's mtime changes with every file renamed into it); None if it is gone."""
        folder = self.incoming / safe_uid(key.study_instance_uid) / safe_uid(
            key.series_instance_uid)
        try:
            return max(0.0, time.time() - folder.stat().st_mtime)
        except FileNotFoundError:
            return None

    def series_files(self, key: SeriesKey) -> list[Path]:
        folder = self.incoming / safe_uid(key.study_instance_uid) / safe_uid(
            key.series_instance_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def pending_series(self) -> list[SeriesKey]:
        """Every series folder in ``incoming/`` (used at start-up to resume work)."""
        return [SeriesKey(series.parent.name, series.name)
                for series in sorted(self.incoming.glob("*/*")) if series.is_dir()]

    def fingerprint(self, key: SeriesKey) -> str:
        """Identifies a series' content: the same instances give the same fingerprint."""
        names = sorted(path.name for path in self.series_files(key))
        return digest("\n".join(names).encode())

    def upload_folder(self, analysis_id: str) -> Path:
        folder = self.uploads / analysis_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def result_folder(self, analysis_id: str) -> Path:
        return self.results / analysis_id

    def remove_upload(self, analysis_id: str) -> None:
        shutil.rmtree(self.uploads / analysis_id, ignore_errors=True)

    def probe_writable(self) -> None:
        """Write, fsync and remove a small file, as an instance would be; raises OSError."""
        probe = self.root / f".probe-{os.getpid()}"
        write_atomically(probe, b"flaircad readiness probe\n")
        probe.unlink()

    # -- leases: which live process owns an analysis ----------------------------------------
    def acquire_lease(self) -> Lease:
        """A token for this process, backed by an exclusive lock on ``owners/<token>.lock``
        held while the process lives: the kernel drops it when the process dies, however it
        dies. Analyses record their owner's token; a process may take over analyses whose
        owner's lock is free (:meth:`owner_alive`). Needs one host's file system (flock)."""
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.owners / f"{token}.lock"
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return Lease(token, path, descriptor)

    def owner_alive(self, token: str | None) -> bool:
        if not token or "/" in token or token.startswith("."):
            return False
        path = self.owners / f"{token}.lock"
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)  # also releases the lock if we got it
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead owner's lock file
        return False


@dataclass
class Lease:
    token: str
    path: Path
    descriptor: int

    def release(self) -> None:
        if self.descriptor < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.descriptor)
        self.descriptor = -1
