"""The FastAPI application: wiring only; the routes live in :mod:`service.api`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service import metrics
from service.api import analyses, dicomweb, problems, system
from service.api.deps import Runtime
from service.config import Settings
from service.engine import Engine
from service.scheduler import Scheduler
from service.spool import Spool
from service.store import AnalysisStore

log = logging.getLogger(__name__)

DESCRIPTION = (
    "flaircad tells multiple sclerosis (MS) from cerebral small vessel disease (cSVD) on "
    "T2-FLAIR MRI and shows why, as Grad-CAM overlays (DICOM Secondary Capture) and a DICOM "
    "SR. RESEARCH USE ONLY - NOT FOR DIAGNOSIS."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings.model_path, settings.providers)
        engine.warm_up()
        spool = Spool(settings.spool_dir)
        store = AnalysisStore(settings.spool_dir / "flaircad.sqlite")
        scheduler = Scheduler(settings, engine, spool, store)
        await scheduler.start()
        metrics.MODEL_INFO.labels(name=engine.info.name, version=engine.info.version,
                                  provider=engine.provider).set(1)
        app.state.runtime = Runtime(settings, engine, spool, store, scheduler)
        log.info("ready: model %s %s on %s", engine.info.name, engine.info.version,
                 engine.provider)
        try:
            yield
        finally:
            app.state.runtime = None
            await scheduler.stop()
            store.close()

    app = FastAPI(title="flaircad", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.runtime = None
    problems.install(app)
    app.include_router(system.router)
    app.include_router(dicomweb.router)
    app.include_router(analyses.router)

    @app.middleware("http")
    async def record_duration(request: Request,
                              call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        metrics.HTTP_DURATION.labels(route=template, method=request.method,
                                     status=str(response.status_code)).observe(
            time.perf_counter() - started)
        return response

    return app
