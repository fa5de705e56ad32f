"""Results back to the PACS: every finished analysis' SC series and SR are sent to each
configured destination (:mod:`service.core.destinations`), with retries and exponential backoff.

State lives in the spool database (table ``deliveries``, one row per analysis and
destination; :class:`service.storage.deliveries.DeliveryStore`), so a restart resumes what was
pending:

* ``pending`` — waiting for its next attempt (``next_attempt``, epoch seconds);
* ``sending`` — claimed by one process (``owner``, its lease token) and in progress; a row
  whose owner died goes back to ``pending``;
* ``sent`` — every instance accepted by the destination;
* ``failed`` — ``delivery_max_attempts`` attempts failed; ``last_error`` says why.

An analysis is marked done and its deliveries are planned in two writes (two connections).
So that a crash between them loses no result, the forwarder reconciles at start and every
30 s: each done analysis still in the database that lacks a row for a configured destination
gets one (:meth:`~service.storage.deliveries.DeliveryStore.plan_missing`, idempotent). A
destination added later therefore also receives the results that retention still keeps.

A failed attempt waits ``delivery_backoff_s × 2^(attempts−1)`` (at most
``delivery_backoff_max_s``, plus up to 10 % jitter) before the next one. Rows name their
destination: a destination removed from the settings leaves its rows as they are (pending rows
resume if it comes back under the same name).

Several processes share the table: a row is claimed with a compare-and-set on its state, so
one result is sent to one destination by one process at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.core.destinations import Destination
from service.intake.multipart import MultipartWriter
from service.storage import DeliveryRepository
from service.storage.deliveries import Delivery, DeliveryState
from service.storage.results import ResultFolder

log = logging.getLogger(__name__)

DELIVERIES = Counter(
    "flaircad_result_deliveries_total",
    "Attempts to send a result (SC series + SR) to a destination, by outcome: sent, retry "
    "(failed, will be tried again), failed (gave up)", ("destination", "kind", "outcome"))
DELIVERY_DURATION = Histogram(
    "flaircad_result_delivery_duration_seconds", "Duration of one delivery attempt",
    ("kind",), buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


# -- senders --------------------------------------------------------------------------------
class DeliveryError(Exception):
    """One attempt failed; the message goes into ``last_error`` (no credentials, no UIDs)."""


def send_stow(destination: Destination, files: list[Path]) -> int:
    """POST every file in one multipart/related request to ``<url>/studies``."""
    import httpx

    writer = MultipartWriter("application/dicom", boundary=f"flaircad-{uuid.uuid4().hex}")
    body = writer.body(({"Content-Type": "application/dicom"}, path.read_bytes())
                       for path in files)
    headers = {key: value.get_secret_value() for key, value in destination.headers.items()}
    headers.update({"Content-Type": writer.content_type, "Accept": "application/dicom+json"})
    auth = None
    if destination.username is not None and destination.password is not None:
        auth = (destination.username, destination.password.get_secret_value())
    url = (destination.url or "").rstrip("/") + "/studies"
    try:
        response = httpx.post(url, content=body, headers=headers, auth=auth,
                              timeout=destination.timeout_s, verify=destination.verify_tls)
    except httpx.HTTPError as error:
        raise DeliveryError(f"{type(error).__name__}: {error}"[:300]) from None
    if response.status_code not in (200, 202):
        raise DeliveryError(f"HTTP {response.status_code} {response.reason_phrase}")
    failed: list[Any] = []
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        failed = response.json().get("00081198", {}).get("Value") or []  # FailedSOPSequence
    if response.status_code == 202 or failed:
        reasons = sorted({str(item.get("00081197", {}).get("Value", ["?"])[0])
                          for item in failed if isinstance(item, dict)})
        raise DeliveryError(f"HTTP {response.status_code}: {len(failed)} of {len(files)} "
                            f"instances refused (FailureReason {', '.join(reasons) or '?'})")
    return len(files)


# SOP classes flaircad writes, and the transfer syntaxes proposed for them
_STORE_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}


def send_cstore(destination: Destination, files: list[Path], calling_ae_title: str) -> int:
    """One association, one C-STORE per file."""
    from pydicom import dcmread
    from pynetdicom import AE

    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    ae.connection_timeout = min(destination.timeout_s, 30.0)
    for sop_class in sorted({str(h.SOPClassUID) for h in headers}):
        syntaxes = sorted({str(h.file_meta.TransferSyntaxUID) for h in headers
                           if str(h.SOPClassUID) == sop_class} | set(_STORE_TRANSFER_SYNTAXES))
        ae.add_requested_context(sop_class, syntaxes)
    assert destination.host is not None and destination.port is not None
    association = ae.associate(destination.host, destination.port,
                               ae_title=destination.ae_title or "ANY-SCP")
    if not association.is_established:
        why = "rejected" if association.is_rejected else (
            "aborted" if association.is_aborted else "no association")
        raise DeliveryError(f"association {why} by {destination.describe()}")
    try:
        for path in files:
            status = association.send_c_store(path)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in _SUCCESS_OR_WARNING:
                raise DeliveryError(
                    "C-STORE failed: " + (f"status 0x{code:04X}" if code >= 0
                                          else "no response (connection lost or timed out)"))
    finally:
        if association.is_established:
            association.release()
    return len(files)


# -- the delivery loop ------------------------------------------------------------------------
class DeliveryCollector(Collector):
    """``flaircad_result_delivery_states{destination, state}``: rows in the spool database (every
    process's), computed when scraped."""

    def __init__(self, store: DeliveryRepository) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("flaircad_result_delivery_states", "", labels=["destination",
                                                                          "state"])

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "flaircad_result_delivery_states", "Results per destination and delivery state "
            "(pending, sending, sent, failed), from the spool database",
            labels=["destination", "state"])
        try:
            counts = self.store.counts()
        except sqlite3.Error as error:  # a busy database must not take /metrics with it
            log.warning("delivery counts unavailable: %s", type(error).__name__)
            return
        for (destination, state), n in sorted(counts.items()):
            family.add_metric([destination, state], n)
        yield family


class Forwarder:
    """Plans a delivery per destination when an analysis is done (:meth:`result_ready`, from
    any thread) and sends them from an asyncio task, in a thread per destination (at most 8)."""

    def __init__(self, destinations: list[Destination], store: DeliveryRepository,
                 result_folder: Callable[[str], Path], owner: str,
                 owner_alive: Callable[[str | None], bool], *, calling_ae_title: str,
                 max_attempts: int, backoff_s: float, backoff_max_s: float,
                 poll_s: float = 1.0) -> None:
        self.destinations = {d.name: d for d in destinations}
        self.store, self._result_folder = store, result_folder
        self.owner, self._owner_alive = owner, owner_alive
        self.calling_ae_title = calling_ae_title
        self.max_attempts, self.backoff_s, self.backoff_max_s = (max_attempts, backoff_s,
                                                                 backoff_max_s)
        self.poll_s = poll_s
        self._executor = ThreadPoolExecutor(max_workers=max(1, min(8, len(self.destinations))),
                                            thread_name_prefix="delivery")
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        released = self.store.release(self._owner_alive)
        if released:
            log.info("deliveries of a process that is gone resume", extra={"n": released})
        try:
            self.reconcile()
        except sqlite3.Error:  # the database busy or full: the loop tries again every 30 s
            log.exception("cannot reconcile the deliveries at start")
        if self.destinations:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # an attempt in progress finishes (bounded by the destination's timeout); its row is
        # recorded, or left "sending" and released by the next start
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._executor.shutdown(wait=True, cancel_futures=True))

    # -- input -------------------------------------------------------------------------------
    def result_ready(self, analysis_id: str) -> None:
        """An analysis is done: plan its deliveries. Thread-safe."""
        if not self.destinations:
            return
        self.store.plan(analysis_id, self.destinations.values())
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def deliveries(self, analysis_id: str) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.store.of_analysis(analysis_id)]

    def reconcile(self) -> int:
        """Plan what :meth:`result_ready` never planned (the process died between the two
        writes, or the database refused the second): see the module docstring."""
        if not self.destinations:
            return 0
        added = self.store.plan_missing(self.destinations.values())
        if added:
            log.warning("deliveries planned late: done results without one",
                        extra={"n": added})
        return added

    # -- internals ---------------------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        # 2.0: int ** int is Any to mypy (a negative exponent would make it a float)
        delay = min(self.backoff_max_s, self.backoff_s * 2.0 ** max(0, attempts - 1))
        return delay * (1 + 0.1 * random.random())

    async def _run(self) -> None:
        """One attempt at a time per destination (a slow or dead destination holds up only
        its own results), all destinations at the same time."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        busy: dict[str, asyncio.Future[None]] = {}
        last_release = time.monotonic()

        def finished(name: str) -> Callable[[asyncio.Future[None]], None]:
            def done(future: asyncio.Future[None]) -> None:
                busy.pop(name, None)
                if not future.cancelled() and future.exception() is not None:
                    log.error("delivery attempt error", exc_info=future.exception())
                assert self._wake is not None
                self._wake.set()
            return done

        while True:
            self._wake.clear()  # before looking: a wake-up from now on is not lost
            due: float | None = None
            try:
                for name in self.destinations:
                    if name in busy:
                        continue
                    for row in self.store.claim_due([name], self.owner, limit=1):
                        future = loop.run_in_executor(self._executor, self._attempt, row)
                        busy[name] = future
                        future.add_done_callback(finished(name))
                if time.monotonic() - last_release > 30:
                    last_release = time.monotonic()
                    self.store.release(self._owner_alive)
                    self.reconcile()
                due = self.store.next_due(n for n in self.destinations if n not in busy)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database busy for 30 s, say: try again shortly
                log.exception("delivery loop error")
            wait = self.poll_s if due is None else min(self.poll_s,
                                                        max(0.0, due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, wait))

    def _attempt(self, row: Delivery) -> None:
        destination = self.destinations[row.destination]
        attempts = row.attempts + 1
        started = time.perf_counter()
        extra = {"analysis_id": row.analysis_id, "destination": destination.name,
                 "kind": destination.kind, "attempt": attempts}
        try:
            # the SC series, then the SR
            files = ResultFolder(self._result_folder(row.analysis_id)).dicom_files()
            if not files:
                raise DeliveryError("the result files are gone from the spool")
            if destination.kind == "stow":
                sent = send_stow(destination, files)
            else:
                sent = send_cstore(destination, files, self.calling_ae_title)
        except Exception as error:
            message = str(error) if isinstance(error, DeliveryError) else (
                f"{type(error).__name__}: {error}"[:300])
            DELIVERY_DURATION.labels(kind=destination.kind).observe(
                time.perf_counter() - started)
            if attempts >= self.max_attempts:
                self.store.record(row.analysis_id, row.destination, DeliveryState.FAILED,
                                  attempts=attempts, error=message)
                DELIVERIES.labels(destination.name, destination.kind, "failed").inc()
                log.error("result delivery failed for good", extra={**extra, "error": message})
            else:
                delay = self.backoff(attempts)
                self.store.record(row.analysis_id, row.destination, DeliveryState.PENDING,
                                  attempts=attempts, next_attempt=time.time() + delay,
                                  error=message)
                DELIVERIES.labels(destination.name, destination.kind, "retry").inc()
                log.warning("result delivery failed; will retry",
                            extra={**extra, "error": message, "retry_in_s": round(delay, 1)})
            return
        DELIVERY_DURATION.labels(kind=destination.kind).observe(time.perf_counter() - started)
        self.store.record(row.analysis_id, row.destination, DeliveryState.SENT,
                          attempts=attempts, instances=sent)
        DELIVERIES.labels(destination.name, destination.kind, "sent").inc()
        log.info("result delivered", extra={**extra, "instances": sent})
