"""The audit trail: one JSON object per line, in ``FLAIRCAD_AUDIT_LOG`` (default
``<spool>/audit.jsonl``, mode 0600).

It answers "who sent or read which examination, when, and what came of it": the caller (API
key name, ``jwt:<sub>``, or ``anonymous`` with authentication off; never a token), the client
address, the request id, Study/Series/SOP Instance UIDs, analysis ids and result UIDs. It never
holds patient names, ids, birth dates or any other DICOM value than UIDs: UIDs identify an
examination for those who may look it up in the PACS, and that is the point of an audit
trail. This is also why UIDs go here and not into the normal log (:mod:`service.logs`).

Events: ``stow`` (STOW-RS: instances stored or refused, per series; conflicts by SOP Instance
UID), ``upload`` (an analysis requested through ``/v1/analyses``, or answered from an earlier
identical one), ``analysis`` (finished: status, prediction, result UIDs), ``read`` (a result,
its instances, its preview or a WADO-RS resource fetched), ``dimse`` (what one C-STORE
association stored, written by :mod:`service.dimse`), ``auth_failed`` (reason and client,
never the token), ``retention`` (what the sweep deleted).

Each line is written with one ``write(2)`` on a file opened with ``O_APPEND``, so lines of
several threads and processes never interleave; the file is opened per line, so it can be
rotated by renaming it (logrotate without ``copytruncate``). The retention sweep does not
shorten it: keep it as long as your audit policy says, and rotate it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_trails: dict[Path, AuditLog] = {}
_trails_lock = threading.Lock()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._folder_made = False  # made on the first line, not when the app is built

    def write(self, event: str, **fields: Any) -> None:
        now = time.time()
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                  + f".{int(now % 1 * 1000):03d}Z", "event": event}
        record.update({key: value for key, value in fields.items() if value is not None})
        line = (json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
                + "\n").encode("ascii")
        try:
            if not self._folder_made:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._folder_made = True
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError:  # never fail a request for its audit line; say so in the log
            log.exception("cannot write the audit log", extra={"audit_event": event})

    def read(self) -> list[dict[str, Any]]:
        """Every record (tests, tools)."""
        try:
            text = self.path.read_text("ascii")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def trail(settings: Any) -> AuditLog:
    """The audit log the settings name (one object per path)."""
    path = Path(settings.audit_log or Path(settings.spool_dir) / "audit.jsonl")
    with _trails_lock:
        if path not in _trails:
            _trails[path] = AuditLog(path)
        return _trails[path]
