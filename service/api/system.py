"""Health, readiness, model description and Prometheus metrics."""

from __future__ import annotations

import errno
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import Runtime, RuntimeDep
from service.api.schemas import Explanation, Health, ModelDescription
from service.api.security import ANY_SCOPE
from service.core.contract import EXPLANATIONS
from service.runtime import metrics
from service.runtime.scheduler import SpoolFull

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health,
            summary="The process is alive (also while draining)")
def healthz() -> Health:
    return Health(status="alive")


_READINESS: dict[int | str, dict[str, Any]] = {
    200: {"model": Health, "description": "ready: model loaded and warmed, spool writable, "
          "queue not full"},
    503: {"model": Health, "description": "`loading`, `draining` (SIGTERM received), "
          "`saturated` (queue full) or `unready` (a check failed); `checks` says which"},
}


@router.get("/readyz", response_model=Health, responses=_READINESS,
            summary="Model loaded and warmed, spool writable, queue not full, not draining")
def readyz(request: Request) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse(Health(status="loading").model_dump(), status_code=503)
    scheduler = rt.scheduler
    checks: dict[str, Any] = {
        "model": {"ok": True, "name": rt.engine.info.name, "version": rt.engine.info.version,
                  "provider": rt.engine.provider, "warmed": True,
                  "load_and_warm_up_ms": rt.warm_up_ms},
        "queue": {"ok": not scheduler.saturated, "depth": scheduler.queue_depth,
                  "max": rt.settings.max_queue, "in_flight": scheduler.in_flight},
        "draining": {"ok": not scheduler.draining},
    }
    try:  # actually write, as a STOW-RS instance would be written
        rt.spool.probe_writable()
        checks["spool"] = {"ok": True}
    except OSError as error:  # the code only: the message would carry the path
        checks["spool"] = {"ok": False,
                           "error": errno.errorcode.get(error.errno or 0, type(error).__name__)}
    # The watermark STOW-RS and uploads refuse at (503 spool_full): past it this instance
    # takes no new data, so it is not ready either; ready again once space is freed.
    max_fill = rt.settings.spool_max_fill
    try:
        fill = scheduler.check_spool_space()
        checks["spool_space"] = {"ok": True, "max_fill": max_fill,
                                 "fill": None if fill is None else round(fill, 4)}
    except SpoolFull as full:
        checks["spool_space"] = {"ok": False, "error": full.code, "max_fill": max_fill,
                                 "fill": round(full.fill, 4)}
    if scheduler.draining:
        status = "draining"
    elif all(check["ok"] for check in checks.values()):
        status = "ready"
    elif not checks["queue"]["ok"] and checks["spool"]["ok"] and checks["spool_space"]["ok"]:
        status = "saturated"
    else:
        status = "unready"
    return JSONResponse(Health(status=status, checks=checks).model_dump(),
                        status_code=200 if status == "ready" else 503)


# no patient data: any authenticated caller (a store-only PACS may check the version)
@router.get("/v1/model", response_model=ModelDescription, summary="The loaded model",
            dependencies=[ANY_SCOPE])
def model(rt: RuntimeDep) -> ModelDescription:
    info = rt.engine.info
    return ModelDescription(
        name=info.name, version=info.version, classes=list(info.class_names),
        preprocessing=asdict(info.preprocessing), provider=rt.engine.provider,
        providers=list(rt.engine.providers), intended_use=info.intended_use,
        architecture=info.architecture, training_summary=info.training_summary,
        calibration={"temperature": info.calibration.temperature,
                     **info.calibration.details},
        out_of_distribution={"method": info.distribution.method,
                             "threshold": info.distribution.threshold,
                             **info.distribution.details},
        explanation=Explanation(map=rt.settings.explanation,
                                description=EXPLANATIONS[rt.settings.explanation]))


@router.get("/metrics", response_class=Response,
            summary="Prometheus metrics (all worker processes merged)",
            responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics(request: Request) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    return Response(metrics.exposition(rt.collectors if rt is not None else ()),
                    media_type=CONTENT_TYPE_LATEST)
