"""What routes reach through ``request.app.state`` (set up in
:func:`service.runtime.app.create_app`): the :class:`Runtime`, taken by a route as a
``rt: RuntimeDep`` parameter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client.registry import Collector

from service.api.problems import Problem
from service.core.codes import Code
from service.core.config import Settings
from service.intake.uploads import Uploads
from service.pipeline.engine import Engine
from service.runtime.pacs import PacsLink
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
    pacs: PacsLink | None = None  # result deliveries, DIMSE listener (when configured)

    @property
    def uploads(self) -> Uploads:
        """The intake of ``POST /v1/analyses`` (claims run by this process's scheduler)."""
        return Uploads(self.spool, self.store, self.scheduler.owner)


def runtime(request: Request) -> Runtime:
    current: Runtime | None = getattr(request.app.state, "runtime", None)
    if current is None:
        raise Problem(503, Code.NOT_READY, "the service is starting", headers={"Retry-After": "5"})
    return current


# a route's parameter ``rt: RuntimeDep``: the runtime, or 503 not_ready while it starts
RuntimeDep = Annotated[Runtime, Depends(runtime)]


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
