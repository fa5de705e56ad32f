"""RFC 9457 problem details: every error the API returns is ``application/problem+json``
with a stable ``code`` (also the last part of ``type``) that clients can switch on."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.middleware import route_template
from service.core.codes import Code

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:flaircad:problem:"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable series",
    500: "Internal error",
    503: "Service unavailable",
}


class Problem(Exception):
    """Raise from a route; the handler renders it."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": TYPE_PREFIX + self.code, "title": self.title,
                                "status": self.status, "detail": self.detail, "code": self.code}
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(problem.body(instance), status_code=problem.status,
                        headers=problem.headers, media_type=PROBLEM_JSON)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, error: Problem) -> JSONResponse:
        return problem_response(error, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(error.status_code,
                                                                    Code.HTTP_ERROR)
        return problem_response(Problem(error.status_code, code, str(error.detail),
                                        headers=dict(error.headers or {})), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")}
                  for e in error.errors()]
        return problem_response(Problem(400, Code.INVALID_REQUEST, "the request is malformed",
                                        errors=errors), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the client's fault; the traceback goes to the log (never request data:
        # the route template, not the path, which may hold a UID).
        log.exception("unhandled error", extra={"method": request.method,
                                                "route": route_template(request.scope)})
        return problem_response(Problem(500, Code.INTERNAL_ERROR, "an internal error occurred; "
                                        "it has been logged"), request.url.path)
