"""Authentication and security headers, as plain ASGI middleware (no buffering of the streamed
STOW-RS bodies, and they run before any route or body parsing).

* :class:`Authentication`: every route needs ``Authorization: Bearer <token>``
  (:mod:`service.runtime.auth`) except :data:`PUBLIC_ROUTES` (probes and scrapes come from the
  platform, without credentials, and say nothing about patients). A refusal is a 401
  problem+json with ``WWW-Authenticate: Bearer`` (RFC 6750), sent before the body is read; it
  is logged and audited without the token, the repeats of one reason and client address within
  ``FLAIRCAD_AUDIT_REFUSAL_WINDOW_S`` as a count (:meth:`service.runtime.audit.AuditLog.refusal`).
  The caller is put into the request's state (``request.state.principal``) for the routes and
  the audit trail.
* :class:`RequireScope`: what the caller may do. Every route but the probes declares the scope
  it needs (``store``: STOW-RS, ``POST /v1/analyses``; ``read``: results, WADO-RS, QIDO-RS;
  none: ``/v1/model``, the docs); a caller without it gets 403 ``insufficient_scope`` with
  ``WWW-Authenticate: Bearer …, error="insufficient_scope", scope="…"`` (RFC 6750 §3.1),
  before the body is read, audited as an ``auth_failed`` refusal (reason
  ``insufficient_scope``, counted per window like the 401s).
* :class:`SecurityHeaders`: on every response ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY``,
  ``Cross-Origin-Resource-Policy: same-origin``, ``Cache-Control: no-store`` (results are
  patient data: no proxy or browser cache keeps them) and, except on the interactive docs,
  ``Content-Security-Policy: default-src 'none'; frame-ancestors 'none'``: nothing an API
  response holds may run as a page.
* CORS stays closed unless ``FLAIRCAD_CORS_ALLOW_ORIGINS`` lists origins (set up in
  :func:`service.runtime.app.create_app` with Starlette's ``CORSMiddleware``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import fastapi.routing
from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import RuntimeDep
from service.api.middleware import route_template
from service.api.problems import PROBLEM_JSON, Problem, problem_response
from service.runtime import audit, logs
from service.runtime.audit import AuditLog
from service.runtime.auth import ANONYMOUS, SCOPES, Authenticator, AuthError, Principal

log = logging.getLogger(__name__)

PUBLIC_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
DOC_ROUTES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")


def principal_of(request: Request) -> Principal:
    return getattr(request.state, "principal", ANONYMOUS)


def client_of(scope: Scope) -> str | None:
    client: Any = scope.get("client")
    return str(client[0]) if client else None


class Authentication:
    def __init__(self, app: ASGIApp, authenticator: Authenticator | None,
                 audit: AuditLog | None = None) -> None:
        """``authenticator`` None: authentication is off (everyone is ``anonymous``)."""
        self.app, self.authenticator, self.audit = app, authenticator, audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.authenticator is None or scope.get("path") in PUBLIC_ROUTES:
            state["principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for name, value in scope.get("headers", ())
                       if name == b"authorization"), None)
        try:
            state["principal"] = self.authenticator.authenticate(header)
        except AuthError as error:
            await self._refuse(scope, receive, send, error)
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      error: AuthError) -> None:
        challenge = 'Bearer realm="flaircad"'
        if error.error:
            challenge += f', error="{error.error}"'
        reason, client = error.error or "no_credentials", client_of(scope)
        # Counted, not written one by one (service.runtime.audit): a flood without a key costs a
        # dictionary update per request, no disk write and no log line but the window's first.
        first = True
        if self.audit is not None:
            first = self.audit.refusal("auth_failed", reason=reason, client=client,
                                       method=scope.get("method"), detail=error.detail,
                                       request_id=logs.REQUEST_ID.get())
        if first:
            log.warning("authentication failed", extra={
                "reason": reason, "client": client, "method": scope.get("method")})
        problem = Problem(401, "unauthorized", error.detail,
                          headers={"WWW-Authenticate": challenge})
        await problem_response(problem, str(scope.get("path", ""))[:200])(scope, receive, send)


class RequireScope:
    """The scope a route needs, as its dependency: ``dependencies=[Depends(RequireScope("read"))]``
    (``None``: any authenticated caller). Runs before the route reads its body."""

    def __init__(self, scope: str | None) -> None:
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        self.scope = scope

    async def __call__(self, request: Request,
                       rt: RuntimeDep) -> None:
        principal = principal_of(request)
        if self.scope is None or self.scope in principal.scopes:
            return
        client = client_of(request.scope)
        # counted per (reason, client) and window, as the 401s: a key probing routes it may
        # not use writes one line per window, not one per request
        first = audit.trail(rt.settings).refusal(
            "auth_failed", reason="insufficient_scope", client=client, method=request.method,
            who=principal.id, scope=self.scope, route=route_template(request.scope),
            request_id=logs.REQUEST_ID.get())
        if first:
            log.warning("authorisation refused", extra={
                "reason": "insufficient_scope", "scope": self.scope, "client": client,
                "method": request.method, "route": route_template(request.scope)})
        raise Problem(403, "insufficient_scope",
                      f"this route needs the {self.scope!r} scope, which the bearer token does "
                      "not have", title="Forbidden", required_scope=self.scope, headers={
                          "WWW-Authenticate": f'Bearer realm="flaircad", '
                          f'error="insufficient_scope", scope="{self.scope}"'})


READ_SCOPE = Depends(RequireScope("read"))
STORE_SCOPE = Depends(RequireScope("store"))
ANY_SCOPE = Depends(RequireScope(None))


def route_scopes(app: FastAPI) -> dict[tuple[str, str], str | None]:
    """(path template, lower-case method) → the scope its :class:`RequireScope` asks for, of
    every route that declares one."""
    found: dict[tuple[str, str], str | None] = {}
    for route in _routes(app):
        dependant = getattr(route, "dependant", None)
        for dependency in getattr(dependant, "dependencies", ()):
            if isinstance(dependency.call, RequireScope):
                for method in getattr(route, "methods", None) or ():
                    found[(str(route.path_format), method.lower())] = dependency.call.scope
    return found


def _routes(app: FastAPI) -> Iterable[Any]:
    """The app's routes with their full paths and dependencies: newer FastAPI keeps included
    routers nested (``iter_route_contexts`` flattens them), older ones copy their routes."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(app.routes) if flatten is None else list(flatten(app.routes))


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope.get("path") in DOC_ROUTES

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                extra = [h for h in _HEADERS if h[0] not in present]
                if b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                if not docs and _CSP[0] not in present:
                    extra.append(_CSP)
                message = {**message, "headers": headers + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def document_security(app: FastAPI) -> None:
    """Declare the bearer scheme in the OpenAPI document: required on every operation except
    :data:`PUBLIC_ROUTES`, each of which may then answer 401; an operation that needs a scope
    says which in ``x-flaircad-scope`` and may answer 403."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "an API key (FLAIRCAD_API_KEYS) or a JWT signed by the configured "
                           "key; not needed when the service runs with FLAIRCAD_AUTH_DISABLED"}
        for path, operations in schema.get("paths", {}).items():
            if path in PUBLIC_ROUTES:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
                operation.setdefault("responses", {}).setdefault("401", {
                    "description": "no or invalid bearer token (WWW-Authenticate: Bearer)",
                    "content": {"application/problem+json": {}}})
        for (path, method), scope in route_scopes(app).items():
            operation = schema.get("paths", {}).get(path, {}).get(method)
            if operation is None or scope is None:
                continue
            operation["x-flaircad-scope"] = scope
            operation.setdefault("responses", {}).setdefault("403", {
                "description": f"the bearer token lacks the {scope!r} scope "
                "(insufficient_scope; WWW-Authenticate says which)",
                "content": {PROBLEM_JSON: {}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
