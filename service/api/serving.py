"""The serving layer, as vLLM's OpenAIServingChat: a chat request -> the engine's request and handle
-> one complete response or an SSE stream. What /v1/completions shares with it is here too (the
answer's shape, gathering the choices, the stream's skeleton and usage). No HTTP parsing here
(routes.py) and no cancellation (cancellation.py owns the handle's end)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from starlette.responses import JSONResponse, Response

from service.api.cancellation import GenerationResponse
from service.api.error_handlers import count_error
from service.api.logprobs import TokenTexts, chat_logprobs, prompt_logprobs_body, prompt_positions
from service.api.media import ImageLoader
from service.api.offload import off_loop
from service.api.protocol import ChatCompletionRequest, SamplingFields
from service.api.responses import (
    AnswerUsage,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    Usage,
    chat_chunk,
    token_choice,
    token_delta,
)
from service.api.sse import DONE, ChunkFrame, EventStreamResponse, sse, sse_error
from service.api.tool_parser import StreamingToolParser, ToolCallAnswer
from service.engine import Engine, Event, GenerationRequest, RequestHandle
from service.errors import ModelNotFound, ServiceError
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.version import vlkit_version

log = logging.getLogger(__name__)


@dataclass
class AnswerShape:
    """What a request asked of its answer beyond the text (defaults: a plain one-choice answer)."""

    n: int = 1
    tokenizer: object = None  # for the logprobs' token texts
    tokens_as_ids: bool = False
    return_token_ids: bool = False
    continuous_usage: bool = False
    prompt_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    stream_interval: int | None = None
    fingerprint: str | None = None  # the answer's system_fingerprint (system_fingerprint(engine))
    echo: str = ""
    echo_only: bool = False  # completions' echo with max_tokens 0: the prompt alone (one token is generated, unshown)
    echo_logprobs: int | None = None  # completions' echo with logprobs: the prompt's come first, that many top ones
    # Chat's own.
    role: str = "assistant"
    prompt_text: str | None = None
    tool_calls: ToolCallAnswer | None = None  # the answer's tool calls are read (the request has tools)

    @classmethod
    def of(cls, body: SamplingFields, request: GenerationRequest, engine: Engine, **route) -> "AnswerShape":
        """What both routes read from their request, and `route`'s own fields."""
        return cls(n=request.params.n, tokenizer=engine.tokenizer, tokens_as_ids=bool(body.return_tokens_as_token_ids),
                   return_token_ids=bool(body.return_token_ids), continuous_usage=body.continuous_usage,
                   prompt_tokens=request.prompt_tokens,
                   prompt_token_ids=request.prompt.input_ids.tolist() if body.return_token_ids else None,
                   stream_interval=body.stream_interval, fingerprint=system_fingerprint(engine), **route)

    def token_texts(self) -> TokenTexts:
        """A choice's logprob token texts (one per choice, fed in order)."""
        return TokenTexts(self.tokenizer, self.tokens_as_ids)

    @property
    def plain(self) -> bool:
        """Chunks carry text and finish reasons only (the pre-rendered frame serves them)."""
        return not (self.return_token_ids or self.continuous_usage or self.tool_calls)


@functools.cache
def _fingerprint(facts: tuple) -> str:
    return f"vlkit-{vlkit_version()}-{hashlib.sha256(repr(facts).encode()).hexdigest()[:8]}"


def system_fingerprint(engine: Engine) -> str:
    """vLLM's system_fingerprint (its default --fingerprint-mode full: "vllm-<version>-<hash8>", the
    hash of its config): "vlkit-<version>-<hash8>", the hash of what the answers depend on besides
    the request (the checkpoint, dtype, quantization, device, context), so that a client that sees
    it change knows a seeded answer may change."""
    settings = engine.settings
    return _fingerprint((settings.model, str(engine.dtype), settings.quantization, engine.device.type,
                         engine.max_model_len))


def response_id(prefix: str, request_id: str | None) -> str:
    """vLLM's answer id: the route's prefix and the request's `request_id` (or a random one)."""
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


class ChatServing:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.images = ImageLoader(settings)

    async def create_chat_completion(self, chat: ChatCompletionRequest, engine: Engine,
                                     arrived: float) -> GenerationResponse:
        """The checks, the grammar, the images and the prompt: every refusal of the request itself
        (400, 404, 413) comes from here, and a full queue's 429 before the request costs its grammar
        and images (the response's submit checks the queue again)."""
        self.check_model(chat.model)
        messages, urls = chat.chat_messages()
        engine.check_image_count(len(urls))  # before fetching or decoding any of them
        engine.check_queue_room()
        constraint = chat.answer_constraint()
        # Compiled off the event loop (cached: the same schema again costs a lookup), before the images.
        grammar = await off_loop(engine.compile_grammar, constraint) if constraint is not None else None
        images = await self.images.load(urls)
        request = await off_loop(engine.prepare, messages, images, grammar=grammar, **chat.to_engine_options())
        request.id = response_id("chatcmpl", chat.request_id)
        model = self.settings.model_name
        shape = AnswerShape.of(chat, request, engine, role=chat.response_role, echo=chat.echoed(),
                               prompt_text=request.prompt.text if chat.return_prompt_text else None,
                               tool_calls=chat.tool_call_answer())

        async def respond(handles: list[RequestHandle]) -> Response:
            (handle,) = handles
            if chat.stream:
                return EventStreamResponse(stream_chunks(handle, request.id, model, chat.include_usage, self.metrics,
                                                         shape))
            return await complete(handle, request.id, model, shape)

        return GenerationResponse(engine, [request], arrived, respond)

    def check_model(self, model: str | None) -> None:
        """vLLM's _is_model_supported: no model or an empty one is the served model."""
        if model and model not in (self.settings.model_name, self.settings.model):
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")


@dataclass
class ChoiceText:
    """One choice's output gathered from its events."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    last: Event | None = None

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        self.token_ids += event.token_ids
        if event.logprobs is not None:  # extended in place: a copy per event was quadratic in the answer's length
            self.logprobs = self.logprobs or []
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.last = event


async def in_intervals(events: AsyncIterator[Event], interval: int | None) -> AsyncIterator[Event]:
    """vLLM's stream_interval: each choice's events merged until they carry `interval` tokens; its
    first and last are sent at once."""
    if not interval or interval <= 1:
        async for event in events:
            yield event
        return
    pending: dict[int, list[Event]] = {}  # joined once sent (pair by pair was quadratic in `interval`)
    tokens: dict[int, int] = {}
    started: set[int] = set()
    async for event in events:
        if event.error is not None:
            yield event
            return
        pending.setdefault(event.index, []).append(event)
        tokens[event.index] = tokens.get(event.index, 0) + len(event.token_ids)
        if event.index not in started or event.finish_reason is not None or tokens[event.index] >= interval:
            started.add(event.index)
            tokens[event.index] = 0
            yield Event.joined(pending.pop(event.index))


async def gather(handle: RequestHandle, n: int) -> list[ChoiceText]:
    """Every choice's output; an error event is raised (the error handlers answer it)."""
    choices = [ChoiceText() for _ in range(n)]
    async for event in handle:
        if event.error is not None:
            raise event.error
        choices[event.index].add(event)
    return choices


def usage_of(choices: list[ChoiceText]) -> AnswerUsage:
    return AnswerUsage.count(choices[0].last.prompt_tokens, sum(c.last.completion_tokens for c in choices))


class StreamUsage:
    """A stream's token counts: each choice's so far (vLLM's continuous_usage_stats: that choice's
    tokens) and, once every choice has ended, the whole answer's (include_usage)."""

    def __init__(self, shape: AnswerShape):
        self.prompt_tokens = shape.prompt_tokens
        self.generated = [0] * shape.n
        self.open = shape.n

    def add(self, event: Event) -> None:
        if event.finish_reason is None:
            self.generated[event.index] += len(event.token_ids)
        else:  # the last event's counts are the engine's own
            self.generated[event.index] = event.completion_tokens
            self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
            self.open -= 1

    def of_choice(self, index: int) -> Usage:
        return Usage.count(self.prompt_tokens, self.generated[index])

    def total(self) -> Usage | None:
        return None if self.open else Usage.count(self.prompt_tokens, sum(self.generated))


# Logprobs cost ~0.3 ms a token to render with 20 top ones (each token's text, then pydantic): an
# answer's (or a stream's merged backlog) of more tokens than this is rendered in a worker thread, so
# that n=8 x 2000 tokens do not hold the event loop, every other request and /health, for seconds.
LOGPROBS_ON_LOOP = 64
YIELD_EVERY = 8  # a stream's events between its yields to the event loop


def long_logprobs(*entries: list | None) -> bool:
    """Whether logprobs of these entries (or of a prompt's tokens) are rendered in a worker thread."""
    return sum(len(e) for e in entries if e) > LOGPROBS_ON_LOOP


async def stream_answer(handle: RequestHandle, shape: AnswerShape, include_usage: bool, metrics: ServiceMetrics,
                        head: list[bytes], render: Callable[[Event, StreamUsage], bytes | None],
                        usage_chunk: Callable[[Usage], bytes]) -> AsyncIterator[bytes]:
    """The SSE stream of either route: its `head`, each event as `render` makes it (None: nothing
    to send), the usage once every choice has ended (when asked), [DONE]. An error after the stream
    started can only be told in the stream: its body, then [DONE]; so is a failure of this layer's
    own (rendering a chunk), as vLLM's stream generators tell it, rather than a connection cut off."""
    for frame in head:
        yield frame
    usage = StreamUsage(shape)
    sent = 0
    try:
        async for event in in_intervals(handle.__aiter__(), shape.stream_interval):
            if event.error is not None:
                count_error(metrics, event.error)
                yield sse_error(event.error)
                break
            usage.add(event)
            # A stream that echoes logprobs renders the prompt's (their texts decoded) in its first chunks.
            heavy = long_logprobs(event.logprobs) or shape.echo_logprobs is not None
            frame = await off_loop(render, event, usage) if heavy else render(event, usage)
            if frame is not None:
                yield frame
            # Neither a waiting event nor a send into a socket with room suspends: a stream with a
            # backlog (a client that read nothing for a while) held the event loop until it was sent.
            # Every few events, not each: a yield is a loop iteration, and this is every token's path.
            sent += 1
            if sent % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if include_usage and (total := usage.total()) is not None:
            yield usage_chunk(total)
    except Exception as exc:  # noqa: BLE001 - told to the client, then [DONE]; the handle is cancelled after
        log.exception("streaming an answer failed")
        error = ServiceError(f"internal error while streaming the answer: {type(exc).__name__}: {exc}")
        count_error(metrics, error)
        yield sse_error(error)
    yield DONE


async def complete(handle: RequestHandle, request_id: str, model: str,
                   shape: AnswerShape | None = None) -> JSONResponse:
    """The whole answer, as its response (made in a worker thread when its logprobs are long)."""
    shape = shape or AnswerShape()
    choices = await gather(handle, shape.n)
    prompt = handle.prompt_logprobs  # asked for (prompt_logprobs, or echo): vLLM's top-level prompt_logprobs

    def response() -> JSONResponse:
        out = []
        for index, c in enumerate(choices):
            logprobs = None if c.logprobs is None else chat_logprobs(c.logprobs, shape.token_texts())
            content, calls, finish_reason = "".join(c.text), [], c.last.finish_reason
            if shape.tool_calls is not None:
                content, calls, finish_reason = shape.tool_calls.message(content, finish_reason)
            message = ResponseMessage(role=shape.role, content=shape.echo + content if content is not None else None,
                                      tool_calls=calls)
            out.append(Choice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason,
                              stop_reason=c.last.stop_reason,
                              token_ids=c.token_ids if shape.return_token_ids else None))
        return JSONResponse(ChatCompletionResponse(
            id=request_id, model=model, usage=usage_of(choices), choices=out, system_fingerprint=shape.fingerprint,
            prompt_logprobs=None if prompt is None else prompt_logprobs_body(prompt_positions(prompt, shape.tokenizer)),
            prompt_token_ids=shape.prompt_token_ids, prompt_text=shape.prompt_text).model_dump())

    long = long_logprobs(*(c.logprobs for c in choices), prompt.prompt_ids if prompt is not None else None)
    return await off_loop(response) if long else response()


def stream_chunks(handle: RequestHandle, request_id: str, model: str, include_usage: bool,
                  metrics: ServiceMetrics, shape: AnswerShape | None = None) -> AsyncIterator[bytes]:
    """The answer as chat chunks: the role (and echo) of each choice, the text as it comes (with
    tools: content and tool-call deltas), then stream_answer's usage and [DONE]. Each kind of chunk
    has the keys vLLM's chat_completion_stream_generator gives it (responses.py's builders)."""
    shape = shape or AnswerShape()
    created = int(time.time())
    frames = [ChunkFrame(request_id, created, model, index) for index in range(shape.n)]
    parsers = [StreamingToolParser() for _ in range(shape.n)] if shape.tool_calls is not None else None
    texts = [""] * shape.n
    token_texts = [shape.token_texts() for _ in range(shape.n)]  # each choice's, across its chunks

    def chunk(choices: list[ChunkChoice], **fields) -> bytes:
        return sse(chat_chunk(request_id, created, model, choices, **fields))

    # vLLM's continuous usage: on every chunk, before any token too.
    start_usage = {"usage": Usage.count(shape.prompt_tokens, 0)} if shape.continuous_usage else {}
    fingerprint = {"system_fingerprint": shape.fingerprint} if shape.fingerprint is not None else {}

    head = []
    for index in range(shape.n):  # vLLM: each choice's role chunk with the prompt's token ids and text
        head.append(chunk([ChunkChoice(index=index, delta=Delta(role=shape.role, content=""), logprobs=None,
                                       finish_reason=None)],
                          prompt_token_ids=shape.prompt_token_ids, prompt_text=shape.prompt_text, **start_usage))
        if shape.echo:
            head.append(chunk([ChunkChoice(index=index, delta=Delta(content=shape.echo), logprobs=None,
                                           finish_reason=None)], **start_usage))

    def render(event: Event, usage: StreamUsage) -> bytes | None:
        if shape.plain and event.logprobs is None and event.finish_reason is None:  # the common case, per token
            return frames[event.index].render(event.text) if event.text else None
        content, calls, finish_reason = event.text, [], event.finish_reason
        if parsers is not None:
            texts[event.index] += event.text
            content, calls, finish_reason = shape.tool_calls.stream_delta(parsers[event.index], texts[event.index],
                                                                          finish_reason)
        token_ids = event.token_ids if shape.return_token_ids else None
        if not (content or calls or finish_reason or event.logprobs or token_ids):  # token ids go out all the same (vLLM)
            return None
        logprobs = None if event.logprobs is None else chat_logprobs(event.logprobs, token_texts[event.index])
        fields = {"usage": usage.of_choice(event.index)} if shape.continuous_usage else {}
        if finish_reason is not None and not include_usage:  # vLLM's: else on the usage chunk
            fields.update(fingerprint)
        return chunk([token_choice(event.index, token_delta(content, calls), logprobs, token_ids, finish_reason,
                                   event.stop_reason)], **fields)

    # vLLM's usage chunk (exclude_none): no choices, the whole answer's usage and system_fingerprint.
    return stream_answer(handle, shape, include_usage, metrics, head, render,
                         lambda total: chunk([], usage=total, **fingerprint))
