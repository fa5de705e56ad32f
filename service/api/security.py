"""Authentication and security headers, as plain ASGI middleware (no buffering of the streamed
STOW-RS bodies, and they run before any route or body parsing).

* :class:`Authentication`: every route needs ``Authorization: Bearer <token>``
  (:mod:`service.auth`) except :data:`PUBLIC_ROUTES` (probes and scrapes come from the
  platform, without credentials, and say nothing about patients). A refusal is a 401
  problem+json with ``WWW-Authenticate: Bearer`` (RFC 6750), sent before the body is read; it
  is logged and audited without the token, the repeats of one reason and client address within
  ``FLAIRCAD_AUDIT_REFUSAL_WINDOW_S`` as a count (:meth:`service.audit.AuditLog.refusal`).
  The caller is put into the request's state (``request.state.principal``) for the routes and
  the audit trail.
* :class:`SecurityHeaders`: on every response ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY``,
  ``Cross-Origin-Resource-Policy: same-origin``, ``Cache-Control: no-store`` (results are
  patient data: no proxy or browser cache keeps them) and, except on the interactive docs,
  ``Content-Security-Policy: default-src 'none'; frame-ancestors 'none'``: nothing an API
  response holds may run as a page.
* CORS stays closed unless ``FLAIRCAD_CORS_ALLOW_ORIGINS`` lists origins (set up in
  :func:`service.app.create_app` with Starlette's ``CORSMiddleware``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.api.problems import Problem, problem_response
from service.audit import AuditLog
from service.auth import ANONYMOUS, Authenticator, AuthError, Principal

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
        # Counted, not written one by one (service.audit): a flood without a key costs a
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
    :data:`PUBLIC_ROUTES`, each of which may then answer 401."""
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
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
