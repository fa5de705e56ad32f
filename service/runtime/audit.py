"""The audit trail: one JSON object per line, in ``FLAIRCAD_AUDIT_LOG`` (default
``<spool>/audit.jsonl``, mode 0600).

It answers "who sent or read which examination, when, and what came of it": the caller (API
key name, ``jwt:<sub>``, or ``anonymous`` with authentication off; never a token), the client
address, the request id, Study/Series/SOP Instance UIDs, analysis ids and result UIDs. It never
holds patient names, ids, birth dates or any other DICOM value than UIDs: UIDs identify an
examination for those who may look it up in the PACS, and that is the point of an audit
trail. This is also why UIDs go here and not into the normal log (:mod:`service.runtime.logs`).

Events: ``stow`` (STOW-RS: instances stored or refused, per series; conflicts by SOP Instance
UID), ``upload`` (an analysis requested through ``/v1/analyses``, or answered from an earlier
identical one), ``analysis`` (finished: status, prediction, result UIDs), ``read`` (a result,
its instances, its preview or a WADO-RS resource fetched), ``dimse`` (what one C-STORE
association stored, written by :mod:`service.intake.dimse`), ``auth_failed`` (reason and client,
never the token; further ones of a window counted in ``auth_failed_repeated``), ``retention``
(what the sweep deleted).

Each line is written with one ``write(2)`` on a file opened with ``O_APPEND``, so lines of
several threads and processes never interleave; the file is opened per line, so it can be
rotated by renaming it (logrotate without ``copytruncate``). The retention sweep does not
shorten it.

Bounds (the trail usually lives on the spool volume, whose filling stops STOW-RS):

* **Rotation**: before a line would take the file past ``FLAIRCAD_AUDIT_MAX_BYTES``, it is
  renamed ``audit.jsonl.1`` (``.1`` → ``.2`` …, up to ``FLAIRCAD_AUDIT_BACKUPS``; the oldest
  is dropped), under an ``flock`` on the full file so that several processes rotate it once.
  The trail then never holds much more than ``(backups + 1) × max_bytes``. ``0``: never
  rotated here (rotate it outside, as before).
* **Refusals** (:meth:`AuditLog.refusal`, the ``auth_failed`` of every 401) are counted in
  memory per (event, reason, client address) and per window of
  ``FLAIRCAD_AUDIT_REFUSAL_WINDOW_S`` seconds (aligned to the clock): the first refusal of a
  window is written as its own line, the others only as a count, one ``auth_failed_repeated``
  line per key when the window has closed (written by the next audit line or refusal, by a
  timer at the end of the window, and at shutdown). Refusals in a window = the ``auth_failed``
  lines + the ``count`` of its ``auth_failed_repeated`` lines. Past
  ``FLAIRCAD_AUDIT_REFUSAL_MAX_KEYS`` keys in one window, other client addresses share the key
  with ``client`` ``"*"``. So a flood of requests without a key costs a dictionary update each,
  and at most ``2 × (max_keys + reasons)`` lines per window and process, whatever its rate.
  Every other event is written as its own line, as it happens.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from service.core.config import Settings

if TYPE_CHECKING:
    from service.storage.store import Record

log = logging.getLogger(__name__)

_trails: dict[Path, AuditLog] = {}
_trails_lock = threading.Lock()

OTHER_CLIENTS = "*"  # the client of refusals past the key limit of a window
_MAX_METHODS = 8  # HTTP methods listed per summary (methods are client-chosen tokens)


def _iso(now: float) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z")


@dataclass
class _Repeats:
    """Refusals of one (event, reason, client) in the current window after its first one."""

    count: int = 0
    first: float = 0.0
    last: float = 0.0
    methods: set[str] = field(default_factory=set)


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = 0, backups: int = 0,
                 refusal_window_s: float = 60.0, refusal_max_keys: int = 256) -> None:
        self.path = path
        self.max_bytes, self.backups = max_bytes, backups
        self.refusal_window_s, self.refusal_max_keys = refusal_window_s, refusal_max_keys
        self._folder_made = False  # made on the first line, not when the app is built
        self._lock = threading.Lock()
        self._window: int | None = None  # index of the refusal window the buckets count
        self._buckets: dict[tuple[str, str, str | None], _Repeats | None] = {}
        self._timer: threading.Timer | None = None
        self._timer_window: int | None = None

    def configure(self, *, max_bytes: int, backups: int, refusal_window_s: float,
                  refusal_max_keys: int) -> None:
        self.max_bytes, self.backups = max_bytes, backups
        self.refusal_window_s, self.refusal_max_keys = refusal_window_s, refusal_max_keys

    # -- individual events -------------------------------------------------------------------
    def write(self, event: str, **fields: Any) -> None:
        if self._window is not None:  # summaries of a closed refusal window go first
            self.flush()
        self._write(event, fields)

    def _write(self, event: str, fields: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        record = {"time": _iso(now), "event": event}
        record.update({key: value for key, value in fields.items() if value is not None})
        line = (json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
                + "\n").encode("ascii")
        try:
            if not self._folder_made:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._folder_made = True
            descriptor = self._open()
            try:
                if self.max_bytes > 0:
                    size = os.fstat(descriptor).st_size
                    if size > 0 and size + len(line) > self.max_bytes:
                        self._rotate(descriptor, len(line))
                        os.close(descriptor)
                        descriptor = self._open()
                os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError:  # never fail a request for its audit line; say so in the log
            log.exception("cannot write the audit log", extra={"audit_event": event})

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _rotate(self, descriptor: int, incoming: int) -> None:
        """``audit.jsonl`` → ``.1`` → … → ``.N`` (the oldest dropped). Under an exclusive
        ``flock`` on the full file, checked again under it: of several processes that found it
        full, one rotates it, the others then find a new file at the path."""
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return
            held = os.fstat(descriptor)
            if (current.st_ino, current.st_dev) != (held.st_ino, held.st_dev):
                return  # rotated by another process meanwhile
            if current.st_size + incoming <= self.max_bytes:
                return
            if self.backups <= 0:
                os.unlink(self.path)
                return
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.rotated(n), self.rotated(n + 1))
            os.replace(self.path, self.rotated(1))
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def files(self) -> list[Path]:
        """The trail's files that exist, oldest first (``.N`` … ``.1``, then the current)."""
        candidates = [self.rotated(n) for n in range(max(self.backups, 0), 0, -1)]
        return [path for path in [*candidates, self.path] if path.exists()]

    # -- refusals: counted, not written one by one -------------------------------------------
    def refusal(self, event: str, *, reason: str, client: str | None,
                method: str | None = None, **fields: Any) -> bool:
        """Record a refused request (an ``auth_failed``). True when it was written as its own
        line (the first of its key in this window: worth a log line too), False when it was
        only counted."""
        window_s = self.refusal_window_s
        if window_s <= 0:
            self.write(event, reason=reason, client=client, method=method, **fields)
            return True
        now = time.time()
        window = math.floor(now / window_s)
        closed: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            if window != self._window:
                closed = self._take_summaries()
                self._window = window
            key = (event, reason, client)
            if key not in self._buckets and len(self._buckets) >= self.refusal_max_keys:
                key = (event, reason, OTHER_CLIENTS)
            if key in self._buckets:
                repeats = self._buckets[key]
                if repeats is None:
                    repeats = self._buckets[key] = _Repeats(first=now)
                    self._schedule(window, window_s)
                repeats.count += 1
                repeats.last = now
                if method is not None and len(repeats.methods) < _MAX_METHODS:
                    repeats.methods.add(method[:16])
                first = False
            else:
                self._buckets[key] = None  # seen once: written below
                first = True
        self._write_summaries(closed)
        if first:
            self._write(event, {"reason": reason, "client": client, "method": method,
                                **fields}, now)
        return first

    def flush(self, force: bool = False) -> None:
        """Write the counts of a closed refusal window (of the current one too: ``force``,
        at shutdown and in tests)."""
        with self._lock:
            if self._window is None:
                return
            window_s = self.refusal_window_s
            if not force and window_s > 0 and math.floor(time.time() / window_s) == self._window:
                return
            closed = self._take_summaries()
            self._window = None
        self._write_summaries(closed)

    def _take_summaries(self) -> list[tuple[str, dict[str, Any]]]:
        """The summary lines of the buckets, which are emptied (under the lock)."""
        window, window_s = self._window, self.refusal_window_s
        out = []
        for (event, reason, client), repeats in self._buckets.items():
            if repeats is None or window is None:
                continue
            out.append((f"{event}_repeated", {
                "reason": reason, "client": client, "count": repeats.count,
                "methods": sorted(repeats.methods) or None, "first": _iso(repeats.first),
                "last": _iso(repeats.last), "window_s": window_s,
                "window_start": _iso(window * window_s)}))
        self._buckets = {}
        return out

    def _write_summaries(self, closed: list[tuple[str, dict[str, Any]]]) -> None:
        for event, fields in closed:
            log.warning("refusals repeated", extra={
                "audit_event": event, "reason": fields["reason"], "client": fields["client"],
                "count": fields["count"], "window_s": fields["window_s"]})
            self._write(event, fields)

    def _schedule(self, window: int, window_s: float) -> None:
        """A timer that writes this window's counts once it has closed, should no audit line
        come after it (under the lock; one timer per window)."""
        if self._timer is not None and self._timer.is_alive() and self._timer_window == window:
            return
        self._timer_window = window
        delay = max((window + 1) * window_s - time.time(), 0.0) + 0.05
        self._timer = threading.Timer(delay, self._flush_from_timer)
        self._timer.daemon = True
        self._timer.name = "audit-refusal-flush"
        self._timer.start()

    def _flush_from_timer(self) -> None:
        try:
            self.flush()
        except Exception:  # a timer thread has nobody to tell but the log
            log.exception("cannot write the audit refusal counts")

    # -- reading -----------------------------------------------------------------------------
    def read(self) -> list[dict[str, Any]]:
        """Every record of the current file (tests, tools)."""
        try:
            text = self.path.read_text("ascii")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def read_all(self) -> list[dict[str, Any]]:
        """Every record of the rotated files and the current one, oldest first."""
        records: list[dict[str, Any]] = []
        for path in self.files():
            try:
                text = path.read_text("ascii")
            except FileNotFoundError:
                continue
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        return records


class _Bounds(TypedDict):
    """AuditLog's bounds, as keyword arguments."""

    max_bytes: int
    backups: int
    refusal_window_s: float
    refusal_max_keys: int


def trail(settings: Settings) -> AuditLog:
    """The audit log the settings name (one object per path; its bounds from the settings)."""
    path = Path(settings.audit_log or Path(settings.spool_dir) / "audit.jsonl")
    bounds: _Bounds = {"max_bytes": settings.audit_max_bytes,
                       "backups": settings.audit_backups,
                       "refusal_window_s": settings.audit_refusal_window_s,
                       "refusal_max_keys": settings.audit_refusal_max_keys}
    with _trails_lock:
        if path not in _trails:
            _trails[path] = AuditLog(path, **bounds)
        else:
            _trails[path].configure(**bounds)
        return _trails[path]


def audit_finished(audit: AuditLog, record: Record) -> None:
    """The ``analysis`` event of a finished analysis: status, prediction, result UIDs."""
    outputs = (record.result or {}).get("outputs", {})
    audit.write(
        "analysis", analysis_id=record.id, source=record.source, status=str(record.status),
        study_instance_uid=record.study_instance_uid,
        series_instance_uid=record.series_instance_uid,
        prediction=(record.result or {}).get("prediction"),
        problem=(record.problem or {}).get("code"),
        sc_series_instance_uid=outputs.get("secondary_capture_series_instance_uid"),
        sr_sop_instance_uid=outputs.get("sr_sop_instance_uid"))
