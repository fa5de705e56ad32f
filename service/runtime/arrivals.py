"""The stability window's bookkeeping: which STOW-RS / C-STORE series are still arriving.

* A series is *open* from its first instance until it is claimed for analysis. Open series
  are bounded: at most ``max_open`` in all and ``max_open_per_sender`` per sender (the
  authenticated client, ``ae:<calling AE>`` for DIMSE). :meth:`ArrivalWindow.open` says no to
  an instance that would open one more (HTTP 503 ``too_many_open_series`` + Retry-After,
  C-STORE 0xA700); instances of open series are always taken, so a series never stalls
  half-received. One sender therefore never fills the window alone.
* A series is *stable* once nothing arrived for the window and no request that carries part
  of it is still in flight (:class:`Hold`): a body that streams for longer than the window
  keeps its series open, so no analysis of part of a series is made.
* Stable series are offered round-robin over senders, the least recently served sender first
  and each sender's oldest series first: a sender with many series does not make another wait
  behind all of them.
* A claim that fails (disk full, the database busy) leaves the series open; it is offered
  again after a backoff that doubles from ``backoff_s`` up to ``backoff_max_s``.

Thread-safe: C-STORE threads open series while the event loop watches them.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from service.storage.spool import SeriesKey, safe_uid

UNKNOWN_SENDER = ""  # series found in the spool at start: they count in all, not per sender

_STUDY_UID, _SERIES_UID = 0x0020000D, 0x0020000E
HEAD_BYTES = 64 * 1024  # the UIDs are looked for this far into a part, no further
# explicit VRs whose length takes 4 bytes (after 2 reserved ones), PS3.5 §7.1.2
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_IMPLICIT_LE = "1.2.840.10008.1.2"
_UNUSUAL = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})  # deflate, big endian


class ArrivalWindow:
    def __init__(self, max_open: int, max_open_per_sender: int, *, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_open, self.max_open_per_sender = max_open, max_open_per_sender
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._clock = clock
        self._lock = threading.RLock()
        # last arrival (monotonic) of every open series; the scheduler reads it directly
        self.last: dict[SeriesKey, float] = {}
        self._sender: dict[SeriesKey, str] = {}
        self._per_sender: Counter[str] = Counter()
        self._holds: Counter[SeriesKey] = Counter()  # requests in flight carrying it
        self._retry_at: dict[SeriesKey, float] = {}
        self._failures: Counter[SeriesKey] = Counter()
        self._served: dict[str, int] = {}  # sender → turn of its last claim
        self._turn = 0

    def __len__(self) -> int:
        return len(self.last)

    def keys(self) -> set[SeriesKey]:
        with self._lock:
            return set(self.last)

    def open(self, key: SeriesKey, sender: str) -> bool:
        """Note an instance of ``key`` from ``sender`` about to be stored: True (the series is
        open, its window restarted), or False when it would open a series past a bound."""
        with self._lock:
            if key not in self.last:
                if len(self.last) >= self.max_open or (
                        sender != UNKNOWN_SENDER
                        and self._per_sender[sender] >= self.max_open_per_sender):
                    return False
                self._sender[key] = sender
                self._per_sender[sender] += 1
            self.last[key] = self._clock()
            return True

    def note(self, key: SeriesKey, at: float | None = None) -> None:
        """An instance of ``key`` was stored (whatever the bounds: it is on disk now)."""
        with self._lock:
            self.last[key] = self._clock() if at is None else at

    def hold(self, key: SeriesKey) -> None:
        with self._lock:
            self._holds[key] += 1

    def release(self, key: SeriesKey) -> None:
        """The request that held ``key`` is over: its window runs from now."""
        with self._lock:
            self._holds[key] -= 1
            if self._holds[key] <= 0:
                del self._holds[key]
            if key in self.last:
                self.last[key] = self._clock()

    def held(self, key: SeriesKey) -> bool:
        with self._lock:
            return self._holds[key] > 0

    def stable(self, window_s: float) -> list[SeriesKey]:
        """The series quiet for ``window_s``, not held and not backing off, in the order they
        should be claimed (round-robin over senders, see the module docstring)."""
        now = self._clock()
        by_sender: dict[str, list[tuple[float, SeriesKey]]] = {}
        with self._lock:
            for key, last in self.last.items():
                if (now - last < window_s or self._holds[key] > 0
                        or self._retry_at.get(key, 0.0) > now):
                    continue
                by_sender.setdefault(self._sender.get(key, UNKNOWN_SENDER), []).append(
                    (last, key))
            served = dict(self._served)
        queues = [sorted(items, key=lambda item: item[0]) for _, items in sorted(
            by_sender.items(), key=lambda entry: (served.get(entry[0], 0),
                                                  min(last for last, _ in entry[1])))]
        order: list[SeriesKey] = []
        for rank in range(max((len(queue) for queue in queues), default=0)):
            order.extend(queue[rank][1] for queue in queues if rank < len(queue))
        return order

    def claimed(self, key: SeriesKey) -> None:
        """``key`` left the window: queued, analysed before, or gone."""
        with self._lock:
            self.last.pop(key, None)
            self._retry_at.pop(key, None)
            self._failures.pop(key, None)
            sender = self._sender.pop(key, None)
            if sender is None:
                return
            self._turn += 1
            self._per_sender[sender] -= 1
            if self._per_sender[sender] <= 0:
                # nothing open: forget it (bounded by the senders with open series), a sender
                # that comes back is served early, which is fair to a light sender
                del self._per_sender[sender]
                self._served.pop(sender, None)
            else:
                self._served[sender] = self._turn

    def claim_failed(self, key: SeriesKey) -> float:
        """The claim of ``key`` failed: it stays open and is offered again after the returned
        number of seconds."""
        with self._lock:
            self._failures[key] += 1
            delay = min(self.backoff_max_s, self.backoff_s * 2.0 ** (self._failures[key] - 1))
            self._retry_at[key] = self._clock() + delay
            return delay


class Hold:
    """The series one STOW-RS request carries, held open (never stable) until :meth:`release`
    (call it in a ``finally``: a hold that leaked would keep its series from ever being
    analysed)."""

    def __init__(self, window: ArrivalWindow, sender: str,
                 refuse: Callable[[], BaseException]) -> None:
        self.window, self.sender, self._refuse = window, sender, refuse
        self.keys: set[SeriesKey] = set()

    def add(self, key: SeriesKey) -> None:
        """Hold ``key`` for this request; raises ``refuse()`` when it would open a series
        past the window's bounds."""
        if not self.window.open(key, self.sender):
            raise self._refuse()
        if key not in self.keys:
            self.window.hold(key)
            self.keys.add(key)

    def release(self) -> None:
        for key in self.keys:
            self.window.release(key)
        self.keys.clear()


def series_of_part(path: Path, study_in_url: str | None = None) -> SeriesKey | None:
    """The series of a received part, read from its first :data:`HEAD_BYTES`; None when that
    does not tell (not DICOM, odd encoding, UIDs further in, the study of the URL not its own):
    such a part is judged when it is stored."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:
        return None
    uids = _uids_fast(head)
    if uids is None:
        uids = _uids_pydicom(head)
    if uids is None:
        return None
    try:
        key = SeriesKey(safe_uid(uids[0]), safe_uid(uids[1]))
    except ValueError:
        return None
    if study_in_url is not None and key.study_instance_uid != study_in_url:
        return None
    return key


def _uids_fast(head: bytes) -> tuple[str, str] | None:
    """Study and Series Instance UID from the top level of a Part 10 head in (implicit or
    explicit) little endian, walking element headers only: ~100 times cheaper than pydicom,
    which matters with thousands of small parts per request. None for anything else."""
    if head[128:132] != b"DICM":
        return None
    offset, syntax = _skip_meta(head, 132)
    if offset is None or syntax in _UNUSUAL:
        return None
    explicit = syntax != _IMPLICIT_LE
    found: dict[int, str] = {}
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        tag = group << 16 | element
        if tag > _SERIES_UID:
            break
        if explicit:
            vr = head[offset + 4:offset + 6]
            if vr in _LONG_VRS:
                if offset + 12 > len(head):
                    return None
                (length,), offset = struct.unpack_from("<I", head, offset + 8), offset + 12
            else:
                (length,), offset = struct.unpack_from("<H", head, offset + 6), offset + 8
        else:
            (length,), offset = struct.unpack_from("<I", head, offset + 4), offset + 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length: pydicom walks it
            return None
        if tag in (_STUDY_UID, _SERIES_UID):
            found[tag] = head[offset:offset + length].decode("ascii", "replace")
        offset += length
    if _STUDY_UID in found and _SERIES_UID in found:
        return found[_STUDY_UID], found[_SERIES_UID]
    return None


def _skip_meta(head: bytes, offset: int) -> tuple[int | None, str]:
    """Past the file meta group (always explicit VR little endian): the dataset's offset and
    its transfer syntax."""
    syntax = ""
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return offset, syntax
        vr = head[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                return None, syntax
            (length,), start = struct.unpack_from("<I", head, offset + 8), offset + 12
        else:
            (length,), start = struct.unpack_from("<H", head, offset + 6), offset + 8
        if element == 0x0010:
            syntax = head[start:start + length].decode("ascii", "replace").strip(" \x00")
        offset = start + length
    return None, syntax


def _uids_pydicom(head: bytes) -> tuple[str, str] | None:
    """The slow way, for the encodings :func:`_uids_fast` leaves out; never raises."""
    from pydicom.filereader import read_partial
    from pydicom.tag import Tag

    try:
        # pydicom warns with the values it dislikes (DICOM content): not here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(io.BytesIO(head), force=True,
                              stop_when=lambda tag, vr, length: tag > _SERIES_UID,
                              specific_tags=[Tag(_STUDY_UID), Tag(_SERIES_UID)])
            study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
    except Exception:  # hostile or cut-off bytes: stow.py says what is wrong with them
        return None
    if not study or not series:
        return None
    return str(study), str(series)
