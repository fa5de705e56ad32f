"""Intake of ``POST /v1/analyses``: an upload's parts become one analysis and its files.

* :func:`fingerprint` — what identifies an upload: the content of its parts, in any order,
  with the model that analyses them and the map it shows (``FLAIRCAD_EXPLANATION``). The same
  instances again (a viewer asking twice) get the same analysis and result UIDs, not a second
  run.
* :meth:`Uploads.claim` — the analysis of that content: an earlier one that did not fail, or a
  new queued one (``again``: always a new one, for ``Cache-Control: no-cache``).
* :meth:`Uploads.keep` — the parts, streamed to the spool's ``tmp/`` by the route, become the
  upload's files ``uploads/<id>/00000.dcm`` …, durably: each fsync'd and renamed, then the
  folder fsync'd, before the analysis may run on them.
* :meth:`Uploads.refuse` — an upload claimed but not queued (the queue filled up while its
  body was read): its files removed, its analysis failed ``saturated``.

HTTP stays in :mod:`service.api.analyses`, which translates requests into these calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.storage.spool import Spool, digest, fsync_file
from service.storage.store import AnalysisStore, Record, Status

SOURCE = "upload"


class UploadedPart(Protocol):
    """A part of the request body, already on disk (``service.api.body.SpooledPart``)."""

    @property
    def path(self) -> Path: ...

    @property
    def sha256(self) -> str: ...


def fingerprint(model_name: str, model_version: str, explanation: str,
                part_digests: Iterable[str], outputs: Iterable[str] = ()) -> str:
    """The upload's identity: the set of its parts' SHA-256, the model, the map shown and
    the DICOM outputs made (another choice of outputs is another result)."""
    chosen = ",".join(sorted(str(o) for o in outputs))
    return "upload:" + digest("\n".join(
        [f"{model_name} {model_version} explanation={explanation}"
         + (f" outputs={chosen}" if chosen else ""),
         *sorted(set(part_digests))]).encode())


def move_into(parts: Sequence[UploadedPart], folder: Path) -> list[Path]:
    """The parts become ``folder``'s files, in their order in the request (a rejection names
    "part n" from the file name): fsync'd, renamed, the folder fsync'd (the renames durable)."""
    for index, part in enumerate(parts):
        fsync_file(part.path)
        os.replace(part.path, folder / f"{index:05d}.dcm")
    fsync_file(folder)
    return sorted(folder.glob("*.dcm"))


@dataclass(frozen=True)
class Uploads:
    """Uploads of one process (``owner``: its lease token, which runs what it claims)."""

    spool: Spool
    store: AnalysisStore
    owner: str

    def claim(self, upload_fingerprint: str, *, again: bool = False) -> tuple[Record, bool]:
        """The analysis of this content and whether it is new (False: an earlier one that did
        not fail, queued, running or finished; its result is the answer)."""
        if again:
            return self.store.create(SOURCE, fingerprint=upload_fingerprint,
                                     owner=self.owner), True
        return self.store.claim_upload(upload_fingerprint, self.owner)

    def keep(self, record: Record, parts: Sequence[UploadedPart]) -> list[Path]:
        """The upload's files, durable (blocks on fsync: call it off the event loop)."""
        return move_into(parts, self.spool.upload_folder(record.id))

    def refuse(self, record: Record) -> None:
        """Undo :meth:`keep` for an upload the queue refused."""
        self.spool.remove_upload(record.id)
        self.store.update(record.id, Status.FAILED, problem={
            "code": "saturated", "detail": "refused: the queue was full"})
