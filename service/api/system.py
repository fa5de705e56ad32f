"""Health, readiness, model description and Prometheus metrics."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import Runtime, runtime
from service.api.schemas import Health, ModelDescription

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Health, summary="Model loaded and warmed, queue not full",
            responses={503: {"model": Health}})
def readyz(request: Request) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse(Health(status="loading").model_dump(), status_code=503)
    checks = {"model": "loaded", "provider": rt.engine.provider,
              "queue_depth": rt.scheduler.queue_depth, "max_queue": rt.settings.max_queue}
    if rt.scheduler.saturated:
        return JSONResponse(Health(status="saturated", checks=checks).model_dump(),
                            status_code=503)
    return JSONResponse(Health(status="ready", checks=checks).model_dump())


@router.get("/v1/model", response_model=ModelDescription, summary="The loaded model")
def model(rt: Annotated[Runtime, Depends(runtime)]) -> ModelDescription:
    info = rt.engine.info
    return ModelDescription(
        name=info.name, version=info.version, classes=list(info.class_names),
        preprocessing=asdict(info.preprocessing), provider=rt.engine.provider,
        providers=list(rt.engine.providers), intended_use=info.intended_use,
        architecture=info.architecture, training_summary=info.training_summary)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
