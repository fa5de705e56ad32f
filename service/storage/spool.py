"""The spool: every accepted DICOM instance on disk before anyone is told it was stored.

Layout under the spool root::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   (STOW-RS, C-STORE)
    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/conflicts      (refused different copies)
    uploads/<analysis id>/<n>.dcm                                          (/v1/analyses)
    results/<analysis id>/…                  (SC, SR, preview: service.storage.results)
    results/.staging-<analysis id>-<random>/…               (a result being written, see below)
    tmp/<random>/<n>.part               (request bodies as they stream in, before they are read)
    owners/<process token>.lock                  (held by each live server process: leases)

Writes go to a temporary file in the target folder, are fsync'd and linked or renamed into
place, and the folder is fsync'd: after a crash a file is either complete or absent. An
instance is linked (``link(2)`` fails when the name exists), so two requests storing the same
SOP Instance UID at once cannot overwrite each other: one stores, the other compares. A result
is written into a staging folder and renamed as a whole (:meth:`Spool.publish_result`): a
reader sees all of it or none, and a crash leaves only a staging folder, removed at the next
start. UIDs become path components only after validation (:func:`safe_uid`), so a hostile UID
cannot escape the spool.
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

from service.storage.results import ResultFolder, ResultFolders, fsync_file

__all__ = ["Lease", "SeriesKey", "Spool", "StoreOutcome", "digest", "file_digest",
           "fsync_file", "safe_uid", "write_atomically"]

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: acknowledged, nothing new
    CONFLICT = "conflict"  # same UID, different bytes: refused, the first copy kept


def safe_uid(uid: str) -> str:
    """``uid`` if it is a syntactically valid DICOM UID (digits and dots, ≤ 64 characters).
    Only DICOM's own padding (NUL, space) is taken off: "1.2.3\n" from a URL is refused."""
    uid = uid.strip(" \x00")
    if not uid or len(uid) > 64 or not _UID.fullmatch(uid):
        raise ValueError(f"not a valid DICOM UID: {uid[:80]!r}")
    return uid


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per call: threads of one process may write the same name at once
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_file(path.parent)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _newest_mtime(folder: Path) -> float:
    """The latest mtime of ``folder`` and the entries in it (one level)."""
    newest = folder.stat().st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


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
        self.result_folders = ResultFolders(self.results)
        self.owners = root / "owners"
        self.tmp = root / "tmp"
        for folder in (self.incoming, self.uploads, self.results, self.owners, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def instance_path(self, key: SeriesKey, sop_instance_uid: str) -> Path:
        return (self.incoming / safe_uid(key.study_instance_uid)
                / safe_uid(key.series_instance_uid) / f"{safe_uid(sop_instance_uid)}.dcm")

    def store_instance(self, key: SeriesKey, sop_instance_uid: str, data: bytes,
                       source: Path | None = None) -> StoreOutcome:
        """Store ``data`` as this instance unless the name exists (then compare). ``source``:
        a file in the spool that already holds ``data`` (a streamed request part), linked
        instead of written again."""
        path = self.instance_path(key, sop_instance_uid)
        if path.exists():
            return self._compare(path, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            temporary = source
            fsync_file(source)
        try:
            os.link(temporary, path)  # never replaces: a racing store of the same name loses
        except FileExistsError:
            return self._compare(path, data)
        finally:
            if source is None:
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()
        fsync_file(path.parent)
        return StoreOutcome.STORED

    @staticmethod
    def _compare(path: Path, data: bytes) -> StoreOutcome:
        same = file_digest(path) == digest(data)
        return StoreOutcome.DUPLICATE if same else StoreOutcome.CONFLICT

    def series_folder(self, key: SeriesKey) -> Path:
        return self.incoming / safe_uid(key.study_instance_uid) / safe_uid(
            key.series_instance_uid)

    def note_conflict(self, key: SeriesKey, sop_instance_uid: str) -> None:
        """Remember that a different instance came under a known UID (and was refused), so
        that the series' analysis can say so."""
        folder = self.series_folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "conflicts", "a", encoding="ascii") as handle:
            handle.write(safe_uid(sop_instance_uid) + "\n")

    def conflicts(self, key: SeriesKey) -> list[str]:
        """SOP Instance UIDs that were re-sent with different content (each once)."""
        try:
            lines = (self.series_folder(key) / "conflicts").read_text("ascii").split()
        except (FileNotFoundError, ValueError):
            return []
        return sorted(set(lines))

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

    # -- results: the layout is service.storage.results' ------------------------------------
    def result(self, analysis_id: str) -> ResultFolder:
        """The result folder of an analysis (it need not exist)."""
        return self.result_folders.of(analysis_id)

    def result_folder(self, analysis_id: str) -> Path:
        return self.result(analysis_id).path

    def staging_folder(self, analysis_id: str) -> Path:
        """An empty folder to write a result into before :meth:`publish_result`."""
        return self.result_folders.staging(analysis_id).path

    def publish_result(self, staging: Path, analysis_id: str) -> Path:
        """Make a staged result durable and visible at once
        (:meth:`service.storage.results.ResultFolders.publish`)."""
        return self.result_folders.publish(staging, analysis_id).path

    def remove_result(self, analysis_id: str) -> None:
        self.result_folders.remove(analysis_id)

    def remove_series(self, key: SeriesKey) -> None:
        """Delete a spooled series: renamed away first (atomic), so that a store racing with
        the deletion recreates the folder rather than writing into one being deleted."""
        folder = self.series_folder(key)
        trash = self.tmp / f"series-{uuid.uuid4().hex}"
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):  # the study folder, once empty
            folder.parent.rmdir()

    def request_folder(self) -> Path:
        """A folder for one request's streamed parts; the caller removes it."""
        folder = self.tmp / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def remove_stale(self, max_age_s: float) -> int:
        """Remove what crashed writers left: staging folders of results and request folders
        in which nothing was written for ``max_age_s``, and the lock files of dead owners
        (:meth:`remove_dead_owner_locks`). Returns how many were removed."""
        now, removed = time.time(), self.remove_dead_owner_locks()
        candidates = [*self.tmp.iterdir(), *self.result_folders.staging_folders()]
        for folder in candidates:
            try:
                if not folder.is_dir() or now - _newest_mtime(folder) < max_age_s:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        return removed

    def fill(self) -> float:
        """The fraction of the spool's file system in use, as ``df`` shows it (space reserved
        for root counts as used)."""
        stats = os.statvfs(self.root)
        if stats.f_blocks == 0:
            return 0.0
        return 1.0 - stats.f_bavail / stats.f_blocks

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
        self.remove_dead_owner_locks()
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.owners / f"{token}.lock"
        # locked under a hidden name, then renamed: a ``<token>.lock`` is never seen unlocked
        # by another process's sweep, which would take this live owner for a dead one
        making = self.owners / f".{token}{_MAKING}"
        descriptor = os.open(making, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, path)
        return Lease(token, path, descriptor)

    def remove_dead_owner_locks(self) -> int:
        """Remove the lock files of owners that are gone (a killed process cannot remove its
        own): a file whose lock can be taken has no live holder. Those that analyses still
        name are removed by :meth:`owner_alive` too; the others would pile up, one per start
        of a process that died. Returns how many were removed."""
        removed = 0
        for path in self.owners.iterdir():
            name = path.name
            if name.endswith(".lock") and not name.startswith("."):
                removed += _remove_if_unlocked(path)
            elif name.endswith(_MAKING) and _older_than(path, _MAKING_GRACE_S):
                # a process that died between creating and renaming its lock file
                removed += _remove_if_unlocked(path)
        return removed

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


_MAKING = ".lock-new"  # a lock file not yet renamed into place (Spool.acquire_lease)
_MAKING_GRACE_S = 60.0  # creating, locking and renaming it takes microseconds


def _older_than(path: Path, age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > age_s
    except FileNotFoundError:
        return False


def _remove_if_unlocked(path: Path) -> int:
    """Unlink ``path`` if nobody holds its lock; 1 if it was removed."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError:  # gone already, or not ours to open
        return 0
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a live owner
        os.close(descriptor)
        return 0
    try:
        # unlinked while still held: what is removed is the file found unowned
        path.unlink()
    except FileNotFoundError:
        return 0
    finally:
        os.close(descriptor)
    return 1


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
