"""The PACS side of a running service: results sent to the configured destinations
(:mod:`service.runtime.forward`) and the optional DIMSE listener (:mod:`service.intake.dimse`).

The service process wires one :class:`PacsLink` next to its scheduler (``service/runtime/app.py``);
``flaircad dimse`` runs the same link, with a scheduler and the model but without HTTP
(:func:`run_standalone`).

Listening with several uvicorn workers: each process tries to bind the DIMSE port and only one
gets it; the others log so and go on without a listener. The one that binds it runs the
stability window of the series it receives (the spool and the database are shared, so any
process may serve the results).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from typing import Any

from service.core.config import Settings
from service.core.limits import Limits
from service.intake.dimse import DimseListener
from service.runtime import audit
from service.runtime.forward import DeliveryCollector, Forwarder
from service.runtime.scheduler import Scheduler
from service.storage.deliveries import DeliveryStore
from service.storage.spool import SeriesKey, Spool
from service.storage.sqlite import database_path

log = logging.getLogger(__name__)


class PacsLink:
    def __init__(self, settings: Settings, spool: Spool, scheduler: Scheduler, *,
                 listen: bool | None = None) -> None:
        self.settings, self.spool, self.scheduler = settings, spool, scheduler
        self.store = DeliveryStore(database_path(settings.spool_dir))
        self.forwarder = Forwarder(
            settings.destinations, self.store, spool.result_folder, scheduler.owner,
            spool.owner_alive, calling_ae_title=settings.dimse_ae_title,
            max_attempts=settings.delivery_max_attempts, backoff_s=settings.delivery_backoff_s,
            backoff_max_s=settings.delivery_backoff_max_s)
        self.collector = DeliveryCollector(self.store)
        listen = settings.dimse_port is not None if listen is None else listen
        self.listener: DimseListener | None = None
        if listen:
            self.listener = DimseListener(
                spool, ae_title=settings.dimse_ae_title, host=settings.dimse_host,
                port=settings.dimse_port if settings.dimse_port is not None else 11112,
                allowed_calling_aes=settings.dimse_allowed_calling_aes,
                arrived=self._arrived, check_capacity=scheduler.check_capacity,
                limits=Limits.of(settings), audit=audit.trail(settings),
                admit=scheduler.open_series)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # finished analyses tell the forwarder (from the worker thread)
        self.scheduler.result_hooks.append(self.forwarder.result_ready)
        await self.forwarder.start()
        if self.listener is not None:
            try:
                self.listener.start()
            except OSError as error:
                if error.errno != errno.EADDRINUSE or self.settings.http_workers == 1:
                    raise
                log.info("DIMSE port taken by a sibling worker process: no listener here")
                self.listener = None
        if self.settings.destinations:
            log.info("result destinations", extra={
                "destinations": [d.name for d in self.settings.destinations]})

    async def stop(self) -> None:
        """Stop listening first (no new work), then stop sending."""
        if self.listener is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.listener.stop)
        await self.forwarder.stop()
        with contextlib.suppress(ValueError):
            self.scheduler.result_hooks.remove(self.forwarder.result_ready)
        self.store.close()

    def deliveries(self, analysis_id: str) -> list[dict[str, Any]]:
        return self.forwarder.deliveries(analysis_id)

    def _arrived(self, key: SeriesKey) -> None:  # a listener thread
        # at once (the window is thread-safe): its window runs from the store, not from when
        # the event loop gets to it
        self.scheduler.note_arrival(key)


async def run_standalone(settings: Settings) -> int:
    """``flaircad dimse``: the DIMSE listener, the analyses and the result deliveries, without
    HTTP; until SIGTERM or SIGINT (which drain like the service does)."""
    from service.pipeline.engine import Engine
    from service.storage.store import AnalysisStore

    engine = Engine(settings.model_path, settings.providers)
    engine.warm_up()
    spool = Spool(settings.spool_dir)
    store = AnalysisStore(database_path(settings.spool_dir))
    scheduler = Scheduler(settings, engine, spool, store)
    await scheduler.start()
    link = PacsLink(settings, spool, scheduler, listen=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await link.start()
        assert link.listener is not None
        host, port = link.listener.address
        log.info("ready", extra={"model": engine.info.name, "provider": engine.provider,
                                 "ae_title": settings.dimse_ae_title, "host": host,
                                 "port": port})
        await stopping.wait()
        log.info("stopping: draining")
    finally:
        if link.listener is not None:
            await loop.run_in_executor(None, link.listener.stop)
            link.listener = None
        await scheduler.stop(settings.shutdown_grace_s)
        await link.stop()
        store.close()
    return 0
