"""Per request: an id (``X-Request-ID``), the duration histogram and one access-log line.

A plain ASGI middleware rather than ``@app.middleware("http")``: it sees the response as it is
sent (streamed bodies included in the duration), and it is not in the way of the body stream
that STOW-RS reads chunk by chunk.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.runtime import logs, metrics

log = logging.getLogger("service.access")

UNMATCHED = "unmatched"  # the route label of requests that matched no route (404)
# Probes and scrapes come every few seconds: their lines are debug unless they fail.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def route_template(scope: Scope) -> str:
    """``/dicomweb/studies/{study}``, never the raw path: paths hold UIDs, and labels must not
    take one value per request."""
    route = scope.get("route")
    return str(getattr(route, "path", UNMATCHED)) if route is not None else UNMATCHED


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value.decode("latin-1") for name, value in scope.get("headers", ())
                         if name == b"x-request-id"), None)
        request_id = logs.sane_request_id(incoming) or uuid.uuid4().hex
        token = logs.REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_with_id)
            failed = False
        finally:
            duration = time.perf_counter() - started
            route = route_template(scope)
            method = str(scope.get("method", ""))
            metrics.HTTP_DURATION.labels(route=route, method=method,
                                         status=str(status)).observe(duration)
            client: Any = scope.get("client")
            # route template, not the path; no query string (it can hold a StudyInstanceUID)
            # A 401 is logged (and audited) by the authentication, once per window and client
            # address: a flood of requests without a key must not cost a line each.
            quiet = (route in QUIET_ROUTES and status < 400) or status == 401
            level = logging.DEBUG if quiet else logging.INFO
            log.log(level, "request", extra={
                "method": method, "route": route, "status": status,
                "duration_ms": round(duration * 1000, 1),
                "client": client[0] if client else None})
            # After an exception the id stays set: the server's error handler logs this same
            # request next, in this request's own task (a context nobody else shares).
            if not failed:
                logs.REQUEST_ID.reset(token)
