"""DIMSE listener (pynetdicom): C-STORE of MR images and C-ECHO, into the same spool and
stability-window assembly as STOW-RS.

* AE title ``FLAIRCAD_DIMSE_AE_TITLE``; associations must call it (called AE title checked).
* Calling AE titles can be restricted (``FLAIRCAD_DIMSE_ALLOWED_CALLING_AES``); others are
  rejected at association time.
* Presentation contexts: MR Image Storage and Enhanced MR Image Storage with the transfer
  syntaxes flaircad decodes (uncompressed, deflated, RLE, JPEG baseline/lossless, JPEG-LS,
  JPEG 2000), and Verification (C-ECHO).
* Each instance goes through :func:`service.intake.stow.store_parts`, as a STOW-RS part would: the
  same checks, the same spool, the same duplicate rules, and its series' stability window
  starts or is extended (``note_arrival``). Failures answer a C-STORE failure status: 0xA700
  out of resources (spool write failed, queue full or draining, too many series open:
  :mod:`service.runtime.arrivals`), 0xC000 cannot understand,
  0x0122 SOP class not supported (no pixel data), 0x0111 a different instance under a known
  SOP Instance UID. The size limits of STOW-RS apply (``FLAIRCAD_MAX_MATRIX``, ...).
* The audit trail gets one ``dimse`` line per association (calling AE title, peer address,
  series and instance counts), as STOW-RS gets one per request.

Runs inside the service (``FLAIRCAD_DIMSE_PORT``) or alone as ``flaircad dimse``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from service.core.limits import Limits
from service.intake.multipart import Part
from service.intake.stow import StowResult, store_parts
from service.runtime.audit import AuditLog
from service.storage.spool import SeriesKey, Spool

if TYPE_CHECKING:  # pynetdicom itself is imported when the listener starts
    from pynetdicom.events import EventHandlerType

log = logging.getLogger(__name__)

ASSOCIATIONS = Counter(
    "flaircad_dimse_associations_total",
    "DIMSE associations to the listener, by outcome (accepted, rejected, aborted)",
    ("outcome",))

STORAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
)
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


class DimseListener:
    """A C-STORE/C-ECHO SCP in background threads. ``arrived(key)`` is called (from a
    listener thread) for every series that received an instance; ``check_capacity()`` raises
    when no new work is taken (queue full, draining); ``admit(key, sender)`` before an
    instance is stored may refuse it (False: too many series open, 0xA700), the sender being
    ``ae:<calling AE title>``."""

    def __init__(self, spool: Spool, *, ae_title: str, host: str, port: int,
                 allowed_calling_aes: list[str], arrived: Callable[[SeriesKey], None],
                 check_capacity: Callable[[], None], limits: Limits | None = None,
                 audit: AuditLog | None = None,
                 admit: Callable[[SeriesKey, str], bool] | None = None) -> None:
        self._admit = admit
        self.spool, self.ae_title, self.host, self.port = spool, ae_title, host, port
        self.allowed_calling_aes = [title.strip() for title in allowed_calling_aes
                                    if title.strip()]
        self._arrived, self._check_capacity = arrived, check_capacity
        self.limits, self.audit = limits or Limits(), audit
        self._server: Any = None
        self._lock = threading.Lock()
        self._received: dict[int, _Received] = {}  # per association, for the audit trail

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when it was started with port 0)."""
        if self._server is None:
            return self.host, self.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve in background threads; OSError when the port is taken."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        if self.allowed_calling_aes:
            ae.require_calling_aet = self.allowed_calling_aes
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.maximum_associations = 16
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_CLOSE, self._on_ended)]
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=handlers)
        host, port = self.address
        log.info("DIMSE listener started", extra={
            "ae_title": self.ae_title, "host": host, "port": port,
            "calling_aes": self.allowed_calling_aes or "any"})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("DIMSE listener stopped")

    # -- events (listener threads) ------------------------------------------------------------
    def _on_accepted(self, event: Any) -> None:
        ASSOCIATIONS.labels(outcome="accepted").inc()

    def _on_rejected(self, event: Any) -> None:
        ASSOCIATIONS.labels(outcome="rejected").inc()
        requestor = event.assoc.requestor
        log.warning("DIMSE association rejected", extra={
            "calling_ae": str(requestor.ae_title).strip(), "peer": requestor.address})

    def _on_aborted(self, event: Any) -> None:
        ASSOCIATIONS.labels(outcome="aborted").inc()

    def _on_ended(self, event: Any) -> None:
        with self._lock:
            received = self._received.pop(id(event.assoc), None)
        if received is None or self.audit is None:
            return
        requestor = event.assoc.requestor
        self.audit.write(
            "dimse", who=f"ae:{str(requestor.ae_title).strip()}", client=requestor.address,
            series=[{"study_instance_uid": key.study_instance_uid,
                     "series_instance_uid": key.series_instance_uid,
                     "new_instances": received.new.get(key, 0)}
                    for key in sorted(received.series, key=lambda k: (k.study_instance_uid,
                                                                       k.series_instance_uid))],
            stored=received.stored, refused=dict(received.refused) or None,
            conflicts=received.conflicts or None)

    def _note(self, event: Any, result: StowResult) -> None:
        with self._lock:
            received = self._received.setdefault(id(event.assoc), _Received())
            received.stored += len(result.stored)
            received.refused.update(why for *_, why in result.failed)
            received.series.update(result.series)
            received.new.update({key: received.new.get(key, 0) + n
                                 for key, n in result.new.items()})
            received.conflicts += [{"series_instance_uid": key.series_instance_uid,
                                    "sop_instance_uid": sop} for key, sop in result.conflicts]

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        try:
            self._check_capacity()
        except Exception as error:  # Saturated / Draining
            log.warning("C-STORE refused: %s", type(error).__name__)
            return OUT_OF_RESOURCES
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            log.exception("C-STORE: cannot encode the received dataset")
            return 0xC000
        part = Part({"content-type": "application/dicom"}, data)
        sender = f"ae:{str(event.assoc.requestor.ae_title).strip()}"
        admit = self._admit
        result = store_parts([part], self.spool, None, source="dimse", limits=self.limits,
                             admit=None if admit is None else lambda key: admit(key, sender))
        self._note(event, result)
        for key in result.series:
            self._arrived(key)
        if result.stored:
            return SUCCESS
        _, _, reason, why = result.failed[0]
        log.info("C-STORE refused", extra={"reason": why})
        return int(reason)


class _Received:
    """What one association stored (audit trail)."""

    def __init__(self) -> None:
        self.stored = 0
        self.refused: Tally[str] = Tally()
        self.series: set[SeriesKey] = set()
        self.new: dict[SeriesKey, int] = {}
        self.conflicts: list[dict[str, str]] = []
