"""One error shape for every failure: ``{"error": {"status", "message", "accepted"?}}``.

Handlers turn our ApiError, FastAPI's validation errors, Starlette's HTTP errors and
anything unexpected into that shape; the unexpected case is logged with its request id
and answered 500 without internals.  A client that hangs up (during the upload, or while
its request waits) is no error of ours: it is answered with status 499 (client closed
request, as nginx counts it), which nobody reads but the access log and the metrics,
and logged at info level without a traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger("anytime.errors")


class ApiError(Exception):
    def __init__(self, status: int, message: str, accepted: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.accepted, self.headers = status, message, accepted, headers or {}


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


CLIENT_CLOSED = 499  # nginx's "client closed request"


class ErrorDetail(BaseModel):
    status: int
    message: str
    accepted: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(status: int, message: str, accepted: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict = {"error": {"status": status, "message": message}}
    if accepted:
        body["error"]["accepted"] = accepted
    return JSONResponse(body, status_code=status, headers=headers)


def doc(*codes: int) -> dict:
    """OpenAPI ``responses`` entries for the given error codes."""
    text = {400: "undecodable image or malformed body", 401: "missing or wrong bearer token",
            406: "no acceptable response type in Accept", 413: "body or image over the limits",
            415: "unsupported content type or image format", 422: "bad parameter",
            429: "shed: the deadline cannot be met at the quality floor, or the queue is full (Retry-After says "
                 "when to retry)",
            503: "not ready (warming up) or draining (Retry-After)", 504: "deadline or request timeout passed"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.accepted, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(req: Request, exc: Exception) -> Response:
        log.info("client closed the connection: %s", exc or "during the upload",
                 extra={"request_id": getattr(req.state, "request_id", None)})
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc, extra={"request_id": getattr(req.state, "request_id", None)})
        return error_response(500, "internal error; the request id in X-Request-Id is in the server log")
