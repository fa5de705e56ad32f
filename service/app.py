"""The FastAPI application: thin routes over the engine."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Response

from service.config import Settings
from service.engine import Engine


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        engine = Engine(settings.model_path, settings.providers)
        engine.warm_up()
        state["engine"] = engine
        yield
        state.clear()

    app = FastAPI(title="flaircad", version="0.1.0", lifespan=lifespan,
                  description="MS vs cSVD on T2-FLAIR MRI with Grad-CAM. Research use only, "
                  "not for diagnosis.")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, str]:
        if "engine" not in state:
            response.status_code = 503
            return {"status": "loading"}
        return {"status": "ready"}

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        engine: Engine = state["engine"]
        info = engine.info
        return {
            "name": info.name,
            "version": info.version,
            "classes": list(info.class_names),
            "preprocessing": asdict(info.preprocessing),
            "provider": engine.provider,
            "providers": list(engine.providers),
            "intended_use": info.intended_use,
            "architecture": info.architecture,
            "training_summary": info.training_summary,
        }

    return app
