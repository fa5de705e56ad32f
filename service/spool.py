"""The spool: every accepted DICOM instance on disk before anyone is told it was stored.

Layout under the spool root::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   (STOW-RS, C-STORE)
    uploads/<analysis id>/<n>.dcm                                          (/v1/analyses)
    results/<analysis id>/…                                                (SC, SR, preview)

Writes go to a temporary file in the target folder, are fsync'd and renamed into place, and the
folder is fsync'd: after a crash a file is either complete or absent. UIDs become path
components only after validation (:func:`safe_uid`), so a hostile UID cannot escape the spool.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
        for folder in (self.incoming, self.uploads, self.results):
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

    def bytes_used(self) -> int:
        return sum(path.stat().st_size for path in self.root.rglob("*") if path.is_file())
