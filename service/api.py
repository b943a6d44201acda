"""The HTTP layer: OpenAI-compatible routes over the engine (FastAPI).

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET /health/ready, GET /metrics.
Every error leaves as {"error": {"message", "type", "param", "code"}} with vLLM's status codes.
The model loads in a background thread, so /health answers at once and /health/ready turns 200
only when the engine is loaded and warmed up.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import Engine, Event, GenerationRequest, RequestHandle
from service.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from service.media import decode_image, fetch_image_bytes
from service.metrics import ServiceMetrics
from service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)
from service.settings import ServiceSettings

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.2
# Images decoded at once, over all requests: a decode can take ~1 GB at max_image_source_pixels, and
# it runs before the queue limit applies, so a burst of large images must not decode all at once.
_CONCURRENT_IMAGE_DECODES = 4


class ServiceState:
    """What the routes share: settings, metrics, and the engine once it is loaded."""

    def __init__(self, settings: ServiceSettings, engine: Engine | None, metrics: ServiceMetrics):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.load_error: str | None = None

    def ready_engine(self) -> Engine:
        engine = self.engine
        if engine is None or not engine.ready:
            raise Unavailable(self.load_error or "The model is still loading; retry when /health/ready says ready.")
        return engine


def create_app(settings: ServiceSettings, engine: Engine | None = None, *,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An app serving `engine`, or loading one from `settings` in the background when it is None."""
    metrics = engine.metrics if engine is not None else ServiceMetrics()
    state = ServiceState(settings, engine, metrics)

    def load_in_background() -> None:
        try:
            loaded = Engine.load(settings, metrics)
            state.engine = loaded  # not ready yet: requests get 503 until the warm-up has passed
            _start_and_warm(loaded, settings)
            log.info("ready: %s (max context %d)", settings.model_name, loaded.max_model_len)
        except BaseException as exc:  # noqa: BLE001 - reported on /health/ready and to the launcher
            state.load_error = f"The model failed to load: {exc}"
            log.error("%s", state.load_error)
            if on_load_failure is not None:
                on_load_failure(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=load_in_background, name="vlkit-load", daemon=True).start()
        elif not state.engine.ready:
            await asyncio.to_thread(_start_and_warm, state.engine, settings)
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="vlkit service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = state
    image_slots = asyncio.Semaphore(_CONCURRENT_IMAGE_DECODES)

    async def load_image(url: str):
        data = await asyncio.to_thread(fetch_image_bytes, url, settings)
        async with image_slots:
            return await asyncio.to_thread(decode_image, data, settings)

    _install_error_handlers(app, metrics)

    async def require_key(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized("Invalid or missing API key: send `Authorization: Bearer <key>`")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        engine = state.engine
        if engine is not None and engine.ready:
            return JSONResponse({"status": "ready", "model": settings.model_name})
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "detail": state.load_error}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict:
        max_len = state.engine.max_model_len if state.engine is not None else settings.max_model_len
        card = ModelCard(id=settings.model_name, root=settings.model, max_model_len=max_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        engine = state.ready_engine()
        body = await _read_body(request, settings.max_request_bytes)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}", kind="malformed") from None
        try:
            chat = ChatCompletionRequest.model_validate(payload)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        _check_supported(chat, settings)
        messages, urls = _to_chat_messages(chat)
        if len(urls) > settings.max_images_per_request:
            raise InvalidRequest(
                f"At most {settings.max_images_per_request} image(s) may be provided in one request; got {len(urls)}.",
                param="messages", kind="too_many_images")
        images = await asyncio.gather(*(load_image(url) for url in urls))
        generation = await asyncio.to_thread(
            engine.prepare, messages, list(images), max_tokens=chat.max_new_tokens, temperature=chat.temperature,
            top_p=chat.top_p, top_k=max(chat.top_k, 0) if chat.top_k is not None else None, seed=chat.seed,
            stop=chat.stop_strings, ignore_eos=chat.ignore_eos)
        handle = engine.submit(generation, asyncio.get_running_loop(), arrived)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return _EngineStream(handle, _stream(handle, generation, settings.model_name, include_usage, metrics))
        return await _complete(request, handle, generation, settings.model_name)

    return app


def _start_and_warm(engine: Engine, settings: ServiceSettings) -> None:
    engine.start(warmup=settings.warmup)


def _install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    def respond(error: ServiceError) -> JSONResponse:
        if error.kind != "cancelled":  # the engine counts those as finished requests
            metrics.errors.labels(error.kind).inc()
        return JSONResponse(error.to_dict(), status_code=error.status)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(InvalidRequest(str(exc.errors()[:3]), kind="malformed"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServiceError(str(exc.detail), kind="http")
        error.status = exc.status_code
        error.type = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "HTTPError")
        return respond(error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return respond(ServiceError(f"Internal error: {type(exc).__name__}: {exc}"))


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The request body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)  # one copy of the body (a growing bytearray, then bytes(), made more)


def _validation_error(exc: ValidationError) -> InvalidRequest:
    """The most specific of pydantic's errors (a union reports one per branch), with a readable path."""
    errors = sorted(exc.errors(), key=lambda e: len(e["loc"]), reverse=True)
    first = errors[0]
    # Drop union-branch labels such as "str" or "list[tagged-union[...]]" from the path.
    where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p == "str")))
    return InvalidRequest(f"{where}: {first['msg']}", param=where or None, kind="malformed")


def _check_supported(chat: ChatCompletionRequest, settings: ServiceSettings) -> None:
    names = {settings.model_name, settings.model}
    if chat.model is not None and chat.model not in names:
        raise ModelNotFound(f"The model `{chat.model}` does not exist.", param="model")
    if chat.n != 1:
        raise InvalidRequest("Only n=1 is supported: one choice per request.", param="n", kind="unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(chat, name):
            raise InvalidRequest(f"{name} is not supported by this server.", param=name, kind="unsupported")
    if chat.logprobs:
        raise InvalidRequest("logprobs are not supported by this server.", param="logprobs", kind="unsupported")
    if chat.tools:
        raise InvalidRequest("tools are not supported by this server.", param="tools", kind="unsupported")
    if chat.response_format and chat.response_format.get("type", "text") != "text":
        raise InvalidRequest("Only response_format type 'text' is supported.", param="response_format",
                             kind="unsupported")


def _to_chat_messages(chat: ChatCompletionRequest) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> the chat template's format, plus the image URLs in prompt order."""
    messages: list[dict] = []
    urls: list[str] = []
    for i, message in enumerate(chat.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": role, "content": message.content or ""})
            continue
        parts: list[dict] = []
        for part in message.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            elif role != "user":
                raise InvalidRequest(f"Images are accepted in user messages only (message {i} is {role!r}).",
                                     param=f"messages.{i}.content", kind="unsupported")
            else:
                parts.append({"type": "image"})
                urls.append(part.image_url.url)
        messages.append({"role": role, "content": parts})
    return messages, urls


async def _complete(request: Request, handle: RequestHandle, generation: GenerationRequest, model: str):
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    parts: list[str] = []
    try:
        async for event in handle:
            if event.error is not None:
                raise event.error
            parts.append(event.text)
            last = event
    finally:
        watcher.cancel()
        handle.cancel()  # a no-op once finished; frees the slot if this task was cancelled
    usage = Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                  total_tokens=last.prompt_tokens + last.completion_tokens)
    return ChatCompletionResponse(
        id=generation.id, model=model, usage=usage,
        choices=[Choice(message=ResponseMessage(content="".join(parts)), finish_reason=last.finish_reason)],
    ).model_dump()


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    while not handle.cancelled:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(_DISCONNECT_POLL_S)


_json_str = json.JSONEncoder(ensure_ascii=False).encode  # escapes exactly as pydantic's JSON does


class _ChunkFrame:
    """One stream's content chunks as SSE bytes: pydantic renders the frame once, json only the text
    (a model + model_dump_json per token cost ~5x more, in the event loop's thread, under the GIL).
    The bytes are those of ChatCompletionChunk(...).model_dump_json() (tests/test_service_http_sse.py)."""

    _SLOT = "\x00"  # stands in for the text and the finish reason; id and model never hold a NUL

    def __init__(self, id: str, created: int, model: str):
        frame = ChatCompletionChunk(id=id, created=created, model=model, choices=[
            ChunkChoice(delta=Delta(content=self._SLOT), finish_reason=self._SLOT)]).model_dump_json()
        self._head, self._middle, self._tail = frame.split('"\\u0000"')

    def render(self, text: str, finish_reason: str | None = None) -> bytes:
        reason = "null" if finish_reason is None else _json_str(finish_reason)
        return f"data: {self._head}{_json_str(text)}{self._middle}{reason}{self._tail}\n\n".encode()


def _sse(body: ChatCompletionChunk) -> bytes:
    return f"data: {body.model_dump_json()}\n\n".encode()


class _EngineStream(StreamingResponse):
    """An SSE response that cancels its request however the response ends. The generator's own
    `finally` runs only once it has started; a client gone before the first chunk (the server
    cancels the response while it sends the headers) would otherwise leave the request running."""

    def __init__(self, handle: RequestHandle, content):
        super().__init__(content, media_type="text/event-stream")
        self._handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._handle.cancel()  # a no-op once the request finished


async def _stream(handle: RequestHandle, generation: GenerationRequest, model: str, include_usage: bool,
                  metrics: ServiceMetrics):
    created = int(time.time())
    try:
        frame = _ChunkFrame(generation.id, created, model)
        yield _sse(ChatCompletionChunk(id=generation.id, created=created, model=model,
                                       choices=[ChunkChoice(delta=Delta(role="assistant", content=""))]))
        last: Event | None = None
        async for event in handle:
            if event.error is not None:
                if event.error.kind != "cancelled":
                    metrics.errors.labels(event.error.kind).inc()
                yield f"data: {json.dumps(event.error.to_dict())}\n\n".encode()
                break
            if event.text or event.finish_reason:
                yield frame.render(event.text, event.finish_reason)
            last = event
        if include_usage and last is not None and last.finish_reason is not None:
            usage = Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                          total_tokens=last.prompt_tokens + last.completion_tokens)
            yield _sse(ChatCompletionChunk(id=generation.id, created=created, model=model, choices=[], usage=usage))
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()  # client gone mid-stream: the engine frees the slot at its next step
