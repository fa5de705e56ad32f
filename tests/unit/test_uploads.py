"""The intake of ``POST /v1/analyses`` (service.intake.uploads), out of the route: an upload's
identity, its claim (the same instances again are the same analysis), its durable files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.intake import uploads as uploads_module
from service.intake.uploads import Uploads, fingerprint, move_into
from service.storage.spool import Spool
from service.storage.store import AnalysisStore, Status


@dataclass
class Part:
    path: Path
    sha256: str


def parts_in(tmp: Path, contents: list[bytes]) -> list[Part]:
    parts = []
    for index, data in enumerate(contents):
        path = tmp / f"part-{index}"
        path.write_bytes(data)
        parts.append(Part(path, hashlib.sha256(data).hexdigest()))
    return parts


def old_fingerprint(name: str, version: str, shown: str, digests: list[str]) -> str:
    """api/analyses.create_analysis before issue 14, so that earlier uploads still match."""
    return "upload:" + hashlib.sha256("\n".join(
        [f"{name} {version} explanation={shown}", *sorted(set(digests))]).encode()).hexdigest()


def test_fingerprint_is_todays_and_ignores_order_and_repeats() -> None:
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    same = fingerprint("m", "1", "hirescam", digests)
    assert same == old_fingerprint("m", "1", "hirescam", digests)
    assert fingerprint("m", "1", "hirescam", [*reversed(digests), digests[0]]) == same
    assert len({same, fingerprint("m", "2", "hirescam", digests),
                fingerprint("m", "1", "gradcam", digests),
                fingerprint("m", "1", "hirescam", digests[:2])}) == 4


@pytest.fixture
def uploads(tmp_path: Path) -> Iterator[Uploads]:
    store = AnalysisStore(tmp_path / "flaircad.sqlite")
    yield Uploads(Spool(tmp_path / "spool"), store, owner="me")
    store.close()


def test_claim_reuses_an_upload_unless_asked_again(uploads: Uploads) -> None:
    first, created = uploads.claim("upload:abc")
    assert created and first.source == "upload" and first.owner == "me"
    again, created = uploads.claim("upload:abc")
    assert (again.id, created) == (first.id, False)
    fresh, created = uploads.claim("upload:abc", again=True)
    assert created and fresh.id != first.id and fresh.fingerprint == "upload:abc"
    uploads.store.update(fresh.id, Status.FAILED)
    uploads.store.update(first.id, Status.FAILED)
    retried, created = uploads.claim("upload:abc")  # a failed one is not the answer
    assert created and retried.id not in (first.id, fresh.id)


def test_keep_moves_the_parts_in_order_durably(uploads: Uploads, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(uploads_module, "fsync_file", synced.append)
    record, _ = uploads.claim("upload:x")
    parts = parts_in(tmp_path, [b"second-sorted", b"a", b"c"])
    files = uploads.keep(record, parts)
    folder = uploads.spool.upload_folder(record.id)
    assert files == [folder / "00000.dcm", folder / "00001.dcm", folder / "00002.dcm"]
    assert [f.read_bytes() for f in files] == [b"second-sorted", b"a", b"c"]
    assert not any(p.path.exists() for p in parts)
    # every part before its rename, then the folder: the renames are on disk
    assert synced == [p.path for p in parts] + [folder]


def test_move_into_fsyncs_the_folder_for_real(tmp_path: Path) -> None:
    folder = tmp_path / "upload"
    folder.mkdir()
    assert move_into(parts_in(tmp_path, [b"1"]), folder) == [folder / "00000.dcm"]


def test_refuse_removes_the_files_and_fails_the_analysis(uploads: Uploads,
                                                         tmp_path: Path) -> None:
    record, _ = uploads.claim("upload:y")
    uploads.keep(record, parts_in(tmp_path, [b"1"]))
    uploads.refuse(record)
    assert not (uploads.spool.uploads / record.id).exists()
    failed = uploads.store.get(record.id)
    assert failed is not None and failed.status is Status.FAILED
    assert failed.problem == {"code": "saturated", "detail": "refused: the queue was full"}
