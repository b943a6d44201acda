"""Every error leaves as {"error": {"message", "type", "param", "code"}}, with vLLM's status codes,
and is counted once in vlkit_request_errors_total{kind}."""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service.errors import InvalidBody, ServiceError
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def count_error(metrics: ServiceMetrics, error: ServiceError) -> None:
    if error.kind != "cancelled":  # the engine counts those as finished requests
        metrics.errors.labels(error.kind).inc()


def request_validation_error(errors: Sequence) -> InvalidBody:
    """vLLM's validation_exception_handler, for what FastAPI itself validates (no route of ours takes
    a typed body: protocol.py validates those): "N validation error(s):" and each error on its line,
    `param` the first one's path."""
    lines = "".join(f"  {error}\n" for error in errors)
    message = f"{len(errors)} validation {'error' if len(errors) == 1 else 'errors'}:\n{lines}".rstrip()
    loc = errors[0].get("loc") if errors and isinstance(errors[0], dict) else None
    return InvalidBody(message, param=".".join(map(str, loc)) if loc else None)


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    def respond(error: ServiceError) -> JSONResponse:
        count_error(metrics, error)
        return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request_validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServiceError(str(exc.detail), kind="http")
        error.status = exc.status_code
        error.type = HTTPStatus(exc.status_code).phrase  # vLLM's http_exception_handler: "Not Found", ...
        return respond(error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return respond(ServiceError(f"Internal error: {type(exc).__name__}: {exc}"))
