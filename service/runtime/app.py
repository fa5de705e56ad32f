"""The FastAPI application: wiring only; the routes live in :mod:`service.api`."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client.registry import Collector

from service.api import analyses, dicomweb, problems, system, wado
from service.api.deps import Runtime
from service.api.middleware import RequestContext
from service.api.security import Authentication, SecurityHeaders, document_security
from service.core.config import Settings
from service.pipeline.engine import Engine
from service.runtime import audit, metrics
from service.runtime.auth import Authenticator, check_configured
from service.runtime.pacs import PacsLink
from service.runtime.scheduler import Scheduler
from service.storage.spool import Spool
from service.storage.sqlite import database_path
from service.storage.store import AnalysisStore

log = logging.getLogger(__name__)

DESCRIPTION = (
    "flaircad tells multiple sclerosis (MS) from cerebral small vessel disease (cSVD) on "
    "T2-FLAIR MRI and shows why, as overlays of an explanation map (HiResCAM by default; "
    "FLAIRCAD_EXPLANATION) in a DICOM Secondary Capture series, and a DICOM SR; inputs unlike "
    "the training data are flagged. RESEARCH USE ONLY - NOT FOR DIAGNOSIS."
)


def _drain_on_sigterm(scheduler: Scheduler, grace_s: float) -> Callable[[], None]:
    """Put a drain in front of the server's SIGTERM handler; returns the undo.

    uvicorn stops listening as soon as it gets SIGTERM, so readiness could never say 503 and
    a sync client's queued analysis would be cut off. Instead the first SIGTERM starts a drain:
    readiness answers 503 ``draining``, new STOW-RS and analyses get 503 + Retry-After, queued
    and running analyses finish (at most ``grace_s``); then uvicorn's own handler runs and
    shuts down as usual. A second SIGTERM ends the grace period at once. Signals exist only in
    the main thread: a server run in another thread (tests) keeps its plain behaviour."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    started = False

    def pass_on(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
        else:  # no server handler (SIG_DFL): behave as if we had not been here
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
            signal.raise_signal(signum)

    async def drain_then_exit(signum: int) -> None:
        await scheduler.drain(grace_s)
        pass_on(signum, None)

    def start_drain(signum: int) -> None:
        log.info("SIGTERM: draining", extra={"grace_s": grace_s})
        task = loop.create_task(drain_then_exit(signum))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal started
        if started:  # a second SIGTERM: stop waiting for analyses, shut down now
            scheduler.end_grace_now()
            pass_on(signum, frame)
            return
        started = True
        # An empty context: the signal lands in whatever request was running, and the drain
        # must not log under that request's id.
        loop.call_soon_threadsafe(start_drain, signum, context=contextvars.Context())

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def _cuda_device_id(engine: Engine) -> int:
    options: dict[str, Any] = engine.session.get_provider_options().get(
        "CUDAExecutionProvider", {})
    try:
        return int(options.get("device_id", 0))
    except (TypeError, ValueError):
        return 0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # credentials are read once, here: a bad key file fails the start, not a request
    authenticator = Authenticator.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_configured(settings, authenticator)  # on, but nothing to check against: stop
        if settings.auth_disabled:
            log.warning("authentication is DISABLED (FLAIRCAD_AUTH_DISABLED=true): anyone who "
                        "reaches this port can send data and read results; use it only for a "
                        "demo on 127.0.0.1", extra={"host": settings.host})
        metrics.forget_dead_processes()  # multiprocess mode: siblings that died unannounced
        started = time.perf_counter()
        engine = Engine(settings.model_path, settings.providers)
        engine.warm_up()
        warm_up_ms = round((time.perf_counter() - started) * 1000, 1)
        spool = Spool(settings.spool_dir)
        store = AnalysisStore(database_path(settings.spool_dir))
        scheduler = Scheduler(settings, engine, spool, store)
        await scheduler.start()
        pacs = PacsLink(settings, spool, scheduler)  # results out, DIMSE in
        await pacs.start()
        metrics.MODEL_INFO.labels(name=engine.info.name, version=engine.info.version,
                                  provider=engine.provider).set(1)
        collectors: list[Collector] = [metrics.SpoolCollector(settings.spool_dir,
                                                              settings.spool_scan_interval_s)]
        collectors.append(pacs.collector)
        gpu = metrics.GpuCollector.create(engine.provider, _cuda_device_id(engine))
        if gpu is not None:
            collectors.append(gpu)
        app.state.runtime = Runtime(settings, engine, spool, store, scheduler, warm_up_ms,
                                    collectors)
        app.state.runtime.pacs = pacs
        restore_sigterm = _drain_on_sigterm(scheduler, settings.shutdown_grace_s)
        log.info("ready", extra={"model": engine.info.name, "model_version": engine.info.version,
                                 "provider": engine.provider, "load_and_warm_up_ms": warm_up_ms,
                                 "gpu_metrics": gpu is not None})
        try:
            yield
        finally:
            restore_sigterm()
            # Also when shut down without our SIGTERM handler (plain uvicorn, SIGINT): finish
            # what was accepted, within the grace period. Results stay readable meanwhile.
            await scheduler.stop(settings.shutdown_grace_s)
            await pacs.stop()
            app.state.runtime = None
            audit.trail(settings).flush(force=True)  # the refusal counts of the open window
            store.close()
            metrics.mark_this_process_dead()

    app = FastAPI(title="flaircad", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.runtime = None
    problems.install(app)
    app.include_router(system.router)
    app.include_router(dicomweb.router)
    app.include_router(wado.router)
    app.include_router(analyses.router)
    # outermost last: request id → security headers → CORS → authentication → routes
    app.add_middleware(Authentication,
                       authenticator=None if settings.auth_disabled else authenticator,
                       audit=audit.trail(settings))
    if settings.cors_allow_origins:  # closed unless origins are listed
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Prefer", "Accept",
                                          "X-Request-ID"],
                           expose_headers=["Location", "Retry-After", "X-Request-ID"])
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestContext)
    document_security(app)
    return app
