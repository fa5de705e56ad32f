"""What routes reach through ``request.app.state`` (set up in
:func:`service.runtime.app.create_app`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from prometheus_client.registry import Collector

from service.api.problems import Problem
from service.core.config import Settings
from service.pipeline.engine import Engine
from service.runtime.scheduler import Saturated, Scheduler
from service.storage.spool import Spool
from service.storage.store import AnalysisStore


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    spool: Spool
    store: AnalysisStore
    scheduler: Scheduler
    warm_up_ms: float = 0.0
    collectors: list[Collector] = field(default_factory=list)  # scraped with /metrics
    pacs: Any = None  # service.runtime.pacs.PacsLink: result deliveries, DIMSE listener


def runtime(request: Request) -> Runtime:
    current: Runtime | None = getattr(request.app.state, "runtime", None)
    if current is None:
        raise Problem(503, "not_ready", "the service is starting", headers={"Retry-After": "5"})
    return current


def ensure_capacity(rt: Runtime) -> None:
    """Refuse new work (503) before reading a body when the queue is full or draining."""
    try:
        rt.scheduler.check_capacity()
    except Saturated as error:
        raise saturated_problem(error) from None


def saturated_problem(error: Saturated) -> Problem:
    """503 + Retry-After; ``code`` is ``saturated`` (queue full) or ``draining`` (SIGTERM)."""
    return Problem(503, error.code, str(error),
                   headers={"Retry-After": str(error.retry_after_s)})
