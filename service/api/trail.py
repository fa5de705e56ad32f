"""The audit trail as routes write it: who (the caller's principal), from where (the client
address) and in which request, then what the route says (:mod:`service.runtime.audit`)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.api.deps import Runtime
from service.api.security import client_of, principal_of
from service.runtime import audit as audit_log
from service.runtime import logs


def audit(request: Request, rt: Runtime, event: str, **fields: Any) -> None:
    """One audit line for ``event``: ``who``, ``client`` and ``request_id`` first (the order
    every route wrote them in), then ``fields``."""
    audit_log.trail(rt.settings).write(
        event, who=principal_of(request).id, client=client_of(request.scope),
        request_id=logs.REQUEST_ID.get(), **fields)
