"""service/storage is everything persistent (issue 14): one SQLite setup for both tables, one
result-folder layout, the deliveries' SQL in one module, retention's deletions in storage;
no other module under service/ spells the database's file name, a result file's name or SQL."""

from __future__ import annotations

import ast
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.core.destinations import Destination
from service.storage import DATABASE, database_path
from service.storage.deliveries import DeliveryState, DeliveryStore
from service.storage.results import ResultFolder, ResultFolders, write_outputs
from service.storage.retention import forget, input_series
from service.storage.spool import SeriesKey, Spool
from service.storage.sqlite import connect
from service.storage.store import AnalysisStore, Status
from tests.conftest import REPO

SERVICE = REPO / "service"
STORAGE = SERVICE / "storage"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


@dataclass
class _Outputs:
    """Shaped like service.pipeline.analysis.Analysis, as far as writing it goes."""

    sc_instances: list[bytes] = field(default_factory=lambda: [b"sc1", b"sc2"])
    pm_instance: bytes | None = b"pm"
    sr_instance: bytes | None = b"sr"
    preview_png: bytes = b"\x89PNG"

    def to_json(self) -> dict[str, Any]:
        return {"prediction": "MS"}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_one_connection_makes_both_tables_whichever_store_opens_the_file(tmp_path: Path) -> None:
    assert database_path(tmp_path) == tmp_path / DATABASE == tmp_path / "flaircad.sqlite"
    DeliveryStore(tmp_path / "d.sqlite").close()
    AnalysisStore(tmp_path / "a.sqlite").close()
    assert _tables(tmp_path / "d.sqlite") >= {"analyses", "deliveries"}
    assert _tables(tmp_path / "a.sqlite") >= {"analyses", "deliveries"}
    db = connect(tmp_path / "c.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    db.close()


def test_a_database_from_before_leases_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / DATABASE
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE analyses (id TEXT PRIMARY KEY, status TEXT NOT NULL, source "
                   "TEXT NOT NULL, study_instance_uid TEXT, series_instance_uid TEXT, "
                   "fingerprint TEXT, created REAL NOT NULL, updated REAL NOT NULL, result "
                   "TEXT, problem TEXT)")
        db.execute("INSERT INTO analyses VALUES ('old', 'done', 'upload', NULL, NULL, NULL, "
                   "1, 1, NULL, NULL)")
    store = AnalysisStore(path)
    old = store.get("old")
    assert old is not None and old.owner is None and old.attempts == 0
    store.close()


def test_retention_keeps_undelivered_results_and_forgets_delivery_rows(tmp_path: Path) -> None:
    path = tmp_path / DATABASE
    analyses, deliveries = AnalysisStore(path), DeliveryStore(path)
    destination = Destination(name="pacs", kind="stow", url="http://127.0.0.1:9/dicom-web")
    sent, waiting = analyses.create("upload"), analyses.create("upload")
    for record in (sent, waiting):
        analyses.update(record.id, Status.DONE)
        deliveries.plan(record.id, [destination])
    deliveries.record(sent.id, "pacs", DeliveryState.SENT, attempts=1, instances=2)
    assert [r.id for r in analyses.expired(time.time() + 1)] == [sent.id]
    analyses.delete(sent.id)
    assert deliveries.of_analysis(sent.id) == [] and analyses.get(sent.id) is None
    assert [d.state for d in deliveries.of_analysis(waiting.id)] == [DeliveryState.PENDING]
    analyses.close()
    deliveries.close()


def test_the_result_folder_layout_is_written_and_read_in_one_place(tmp_path: Path) -> None:
    written = write_outputs(_Outputs(), tmp_path / "out")
    folder = ResultFolder(tmp_path / "out")
    assert written == {"result": folder.result_json, "preview": folder.preview, "sr": folder.sr,
                       "pm": folder.pm, "sc": [folder.sc_path(1), folder.sc_path(2)]}
    assert folder.sc_path(2) == tmp_path / "out" / "sc" / "IM0002.dcm"
    assert folder.sr == tmp_path / "out" / "sr.dcm"
    assert folder.pm == tmp_path / "out" / "pm.dcm" and folder.pm.read_bytes() == b"pm"
    assert folder.preview.read_bytes() == b"\x89PNG"
    assert (tmp_path / "out" / "result.json").read_text() == '{\n  "prediction": "MS"\n}\n'
    # what is sent to a PACS and served: the SC series in order, the map, then the SR
    assert folder.dicom_files() == [folder.sc_path(1), folder.sc_path(2), folder.pm, folder.sr]
    assert ResultFolder(tmp_path / "gone").dicom_files() == []


def test_staging_and_publishing_through_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert isinstance(spool.result_folders, ResultFolders)
    staging = spool.staging_folder("a" * 32)
    other = spool.staging_folder("b" * 32)
    assert spool.result_folders.staging_folders("a" * 32) == [staging]
    write_outputs(_Outputs(), staging)
    published = spool.publish_result(staging, "a" * 32)
    assert published == spool.result_folder("a" * 32) == spool.result("a" * 32).path
    assert spool.result("a" * 32).sr.read_bytes() == b"sr"
    spool.result_folders.remove_staging("b" * 32)
    assert not other.exists() and spool.result("a" * 32).exists()


def test_forget_deletes_results_input_and_rows(tmp_path: Path) -> None:
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / DATABASE)
    record = store.create("stow", STUDY, SERIES)
    key = input_series(spool, record)
    assert key == SeriesKey(STUDY, SERIES)
    spool.store_instance(key, "1.2.3", b"instance")
    write_outputs(_Outputs(), spool.result_folder(record.id))
    assert forget(spool, store, record, key) is True
    assert not spool.result(record.id).exists() and not spool.series_folder(key).exists()
    assert store.get(record.id) is None
    # an upload's input is its folder; a hostile UID is never a path
    upload = store.create("upload")
    (spool.upload_folder(upload.id) / "00000.dcm").write_bytes(b"x")
    assert input_series(spool, upload) is None
    assert forget(spool, store, upload, None) is False
    assert not (spool.uploads / upload.id).exists()
    assert input_series(spool, store.create("stow", "../..", SERIES)) is None
    store.close()


# -- nobody else knows ------------------------------------------------------------------------
_LAYOUT_NAMES = {DATABASE, "sr.dcm", "preview.png", "result.json"}
_SQL = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE TABLE", "ALTER TABLE", "PRAGMA ")


def _strings(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_only_storage_spells_file_names_of_the_spool_or_sql() -> None:
    offenders = []
    for path in sorted(SERVICE.rglob("*.py")):
        if STORAGE in path.parents:
            continue
        for text in _strings(path):
            # "sc" is also the FLAIRCAD_OUTPUTS name of the SC series, which is a setting's value
            is_sc_folder = text == "sc" and path != SERVICE / "core" / "outputs.py"
            if text in _LAYOUT_NAMES or is_sc_folder or text.startswith(".staging-") or \
                    text.lstrip().upper().startswith(_SQL):
                offenders.append(f"{path.relative_to(REPO)}: {text[:40]!r}")
    assert offenders == []
