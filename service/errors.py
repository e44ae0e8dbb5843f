"""Error responses: one shape for every error, exactly as the OpenAPI document states it.

Every error body has ``detail``, a message in words (what the web page and a person read).  A 422
(the request parsed but is not acceptable) also lists each problem with where it is, in the items
of FastAPI's validation errors: ``{"detail": "...", "errors": [{"loc": [...], "msg": "...",
"type": "..."}]}`` (``ValidationFailed``), both for the framework's own validation (pydantic's
``input`` and ``ctx`` are left out: they may echo megabytes of the request, or hold objects) and
for the checks the routes make (``invalid``; a plain ``HTTPException(422, "message")`` gets one
item at ``["body"]``).  Every other error -- 400, 401, 403, 404, 405, 409, 413 -- is ``{"detail":
"..."}`` (``Error``).  Each route lists the errors it answers in its OpenAPI ``responses``
(``error_responses``), and none keeps FastAPI's default 422 schema, which this app does not answer.
(GET /health/ready's 503 is no error of the request: it answers the readiness report.)

A 405's ``Allow`` header lists every method of the path (Starlette's names only the methods of the
first route that matched the path, e.g. GET for ``/jobs/{id}``, which also takes DELETE).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class Error(BaseModel):
    """The body of every error response but 422."""

    detail: str = Field(description="what is wrong, in words")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description='where: ["body", field, ...], ["path", name], ["query", name]')
    msg: str
    type: str = Field(description="the kind of problem, e.g. missing, int_type, value_error")


class ValidationFailed(BaseModel):
    """The body of a 422: the message, and each problem with where it is."""

    detail: str = Field(description="what is wrong, in words (the items' messages joined)")
    errors: list[ErrorItem] = Field(min_length=1)


_WHY = {
    400: "the request body could not be parsed (malformed multipart, undecodable bytes)",
    401: "no admin bearer token (Authorization: Bearer <VOXGEN_ADMIN_TOKEN>)",
    403: "a wrong admin token, or the service has no admin token configured",
    404: "no such model, direction, job or result file",
    409: "a model of that name is already served",
    413: "the request body is over the limit (VOXGEN_MAX_UPLOAD_MB for uploads, 16 MiB otherwise)",
    422: "the request is not acceptable: each problem with where it is",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error statuses a route answers."""
    return {code: {"model": ValidationFailed if code == 422 else Error, "description": _WHY[code]} for code in codes}


class Invalid(HTTPException):
    """A 422 for a check a route makes, at ``loc`` (under the body)."""

    def __init__(self, msg: str, loc: tuple[str | int, ...]) -> None:
        super().__init__(422, detail=msg)
        self.loc = ["body", *loc]


def invalid(msg: str, *loc: str | int) -> Invalid:
    """``raise invalid("latent must have 16 values", "latent")``: one item at ``body.latent``."""
    return Invalid(msg, loc)


def _loc(loc: Any) -> list[str | int]:
    return [x if isinstance(x, (str, int)) and not isinstance(x, bool) else str(x) for x in (loc or ())]


def _message(items: list[dict[str, Any]]) -> str:
    def one(e: dict[str, Any]) -> str:
        where = ".".join(str(x) for x in e["loc"])
        return f"{where}: {e['msg']}" if where else e["msg"]

    return "; ".join(one(e) for e in items)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of this path takes: each one the app's routes would fully match
    (asked through ``BaseRoute.matches``, so included routers are searched as the router does)."""
    routes = request.app.router.routes
    return [
        m
        for m in _METHODS
        if any(r.matches({**request.scope, "type": "http", "method": m})[0] is Match.FULL for r in routes)
    ]


def install(app: FastAPI) -> None:
    """Register the handlers that give every error response its documented shape."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        items = [
            {"loc": _loc(e.get("loc")), "msg": str(e.get("msg", "")), "type": str(e.get("type") or "value_error")}
            for e in exc.errors()
        ] or [{"loc": ["body"], "msg": "invalid request", "type": "value_error"}]
        return JSONResponse(status_code=422, content={"detail": _message(items), "errors": items})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # none found: the static files' mount (StaticFiles answers 405 itself), GET and HEAD
            headers["Allow"] = ", ".join(allowed_methods(request) or ("GET", "HEAD"))
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        content: dict[str, Any] = {"detail": detail}
        if exc.status_code == 422:
            loc = exc.loc if isinstance(exc, Invalid) else ["body"]
            content["errors"] = [{"loc": loc, "msg": detail, "type": "value_error"}]
        return JSONResponse(status_code=exc.status_code, content=content, headers=headers)
