"""The routes, thin: parse the request, call the serving layer, return its answer."""
from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from service.api.completions import CompletionRequest
from service.api.protocol import ChatCompletionRequest
from service.api.responses import ModelCard, ModelList
from service.api.state import ServiceState
from service.errors import Cancelled, InvalidBody, PayloadTooLarge, RequestTimeout, Unauthorized
from service.version import vlkit_version

router = APIRouter()


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


async def require_key(request: Request) -> None:
    key = service_state(request).settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("Invalid or missing API key: send `Authorization: Bearer <key>`")


async def require_json(request: Request) -> None:
    """vLLM's validate_json_request: a body sent as anything else (a web page's form or text/plain
    POST, which needs no CORS preflight) is refused before it is read."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
        raise InvalidBody("1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed")


JSON_API = [Depends(require_key), Depends(require_json)]


@router.get("/health")
async def health(state: ServiceState = Depends(service_state)) -> Response:
    """vLLM's: 200 (empty) once the engine serves, 503 before (loading) or when it failed."""
    return Response(status_code=200 if state.ready else 503)


@router.get("/version")
async def version() -> dict:
    return {"version": vlkit_version()}


@router.get("/health/ready")
async def ready(state: ServiceState = Depends(service_state)) -> JSONResponse:
    if state.ready:
        return JSONResponse({"status": "ready", "model": state.settings.model_name})
    status = "failed" if state.load_error else "loading"
    return JSONResponse({"status": status, "detail": state.load_error}, status_code=503)


@router.get("/metrics")
async def prometheus_metrics(state: ServiceState = Depends(service_state)) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(state: ServiceState = Depends(service_state)) -> dict:
    settings = state.settings
    max_len = state.engine.max_model_len if state.engine is not None else settings.max_model_len
    card = ModelCard(id=settings.model_name, root=settings.model, max_model_len=max_len)
    return ModelList(data=[card]).model_dump()


@router.post("/v1/chat/completions", dependencies=JSON_API)
async def chat_completions(request: Request) -> Response:
    arrived = time.monotonic()
    state = service_state(request)
    engine = state.ready_engine()
    chat = with_header_request_id(ChatCompletionRequest.parse(await body_of(request, state)), request)
    return await state.serving.create_chat_completion(chat, engine, arrived)


@router.post("/v1/completions", dependencies=JSON_API)
async def completions(request: Request) -> Response:
    arrived = time.monotonic()
    state = service_state(request)
    engine = state.ready_engine()
    completion = with_header_request_id(CompletionRequest.parse(await body_of(request, state)), request)
    return await state.completions.create_completion(completion, engine, arrived)


@router.post("/tokenize", dependencies=JSON_API)
async def tokenize(request: Request) -> JSONResponse:
    state = service_state(request)
    engine = state.ready_engine()
    return JSONResponse(await state.tokenization.tokenize(await body_of(request, state),
                                                          engine))


@router.post("/detokenize", dependencies=JSON_API)
async def detokenize(request: Request) -> JSONResponse:
    state = service_state(request)
    engine = state.ready_engine()
    return JSONResponse(await state.tokenization.detokenize(
        await body_of(request, state), engine))


def with_header_request_id(body, request: Request):
    """vLLM's _base_request_id: an X-Request-Id header (a tracing proxy's) is the answer's id, over the body's."""
    header = request.headers.get("x-request-id")
    if header is not None:
        body.request_id = header
    return body


async def body_of(request: Request, state: ServiceState) -> bytes:
    """The request's body within the settings' size and time limits."""
    return await read_body(request, state.settings.max_request_bytes, state.settings.body_timeout_seconds)


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is over `limit` (before it is all read, when it says
    its length), and with 408 when it has not all arrived within `timeout` seconds (uvicorn has no
    body deadline of its own; None: no deadline)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The request body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []

    async def collect() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout)
    except ClientDisconnect:
        raise Cancelled("the client went away while sending the request") from None
    except asyncio.TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} s.") from None
    return b"".join(chunks)  # one copy of the body (a growing bytearray, then bytes(), made more)
