"""The serving layer, as vLLM's OpenAIServingChat: a chat request -> the engine's request and handle
-> one complete response or an SSE stream. No HTTP parsing here (routes.py) and no cancellation
(cancellation.py owns the handle's end)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.responses import JSONResponse, Response

from service.api.cancellation import GenerationResponse
from service.api.error_handlers import count_error
from service.api.logprobs import chat_logprobs
from service.api.media import ImageLoader
from service.api.offload import off_loop
from service.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    Usage,
)
from service.api.sse import DONE, ChunkFrame, EventStreamResponse, sse, sse_error
from service.api.tool_parser import StreamingToolParser, ToolCallAnswer
from service.engine import Engine, Event, GenerationRequest, RequestHandle
from service.errors import ModelNotFound
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings


@dataclass
class AnswerShape:
    """What a request asked of its answer beyond the text (defaults: a plain one-choice answer)."""

    n: int = 1
    tokenizer: object = None  # for the logprobs' token texts
    tokens_as_ids: bool = False
    return_token_ids: bool = False
    continuous_usage: bool = False
    role: str = "assistant"
    echo: str = ""
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    stream_interval: int | None = None
    tool_calls: ToolCallAnswer | None = None  # the answer's tool calls are read (the request has tools)

    @classmethod
    def of(cls, chat: ChatCompletionRequest, request: GenerationRequest, engine: Engine) -> "AnswerShape":
        return cls(n=request.params.n, tokenizer=engine.tokenizer, tokens_as_ids=bool(chat.return_tokens_as_token_ids),
                   return_token_ids=bool(chat.return_token_ids), continuous_usage=chat.continuous_usage,
                   role=chat.response_role, echo=chat.echoed(),
                   prompt_token_ids=request.prompt.input_ids.tolist() if chat.return_token_ids else None,
                   prompt_text=request.prompt.text if chat.return_prompt_text else None,
                   stream_interval=chat.stream_interval, tool_calls=chat.tool_call_answer())

    @property
    def plain(self) -> bool:
        """Chunks carry text and finish reasons only (the pre-rendered frame serves them)."""
        return not (self.return_token_ids or self.continuous_usage or self.tool_calls)


class ChatServing:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.images = ImageLoader(settings)

    async def create_chat_completion(self, chat: ChatCompletionRequest, engine: Engine,
                                     arrived: float) -> GenerationResponse:
        """The checks, the grammar, the images and the prompt: every refusal of the request itself
        (400, 404, 413) comes from here; the queue's 429 comes when the response submits it."""
        self.check_model(chat.model)
        messages, urls = chat.chat_messages()
        engine.check_image_count(len(urls))  # before fetching or decoding any of them
        constraint = chat.answer_constraint()
        # Compiled off the event loop (cached: the same schema again costs a lookup), before the images.
        grammar = await off_loop(engine.compile_grammar, constraint) if constraint is not None else None
        images = await self.images.load(urls)
        request = await off_loop(engine.prepare, messages, images, grammar=grammar, **chat.to_engine_options())
        if chat.request_id:
            request.id = f"chatcmpl-{chat.request_id}"
        model = self.settings.model_name
        shape = AnswerShape.of(chat, request, engine)

        async def respond(handle: RequestHandle) -> Response:
            if chat.stream:
                return EventStreamResponse(stream_chunks(handle, request.id, model, chat.include_usage, self.metrics,
                                                         shape))
            return JSONResponse((await complete(handle, request.id, model, shape)).model_dump())

        return GenerationResponse(engine, request, arrived, respond)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.settings.model_name, self.settings.model):
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
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + event.logprobs
        if event.finish_reason is not None:
            self.last = event


async def in_intervals(events: AsyncIterator[Event], interval: int | None) -> AsyncIterator[Event]:
    """vLLM's stream_interval: each choice's events merged until they carry `interval` tokens; its
    first and last are sent at once."""
    if not interval or interval <= 1:
        async for event in events:
            yield event
        return
    pending: dict[int, Event] = {}
    started: set[int] = set()
    async for event in events:
        if event.error is not None:
            yield event
            return
        merged = pending.pop(event.index).merged(event) if event.index in pending else event
        if event.index not in started or merged.finish_reason is not None or len(merged.token_ids) >= interval:
            started.add(event.index)
            yield merged
        else:
            pending[event.index] = merged


async def gather(handle: RequestHandle, n: int) -> list[ChoiceText]:
    """Every choice's output; an error event is raised (the error handlers answer it)."""
    choices = [ChoiceText() for _ in range(n)]
    async for event in handle:
        if event.error is not None:
            raise event.error
        choices[event.index].add(event)
    return choices


def usage_of(choices: list[ChoiceText]) -> Usage:
    return Usage.count(choices[0].last.prompt_tokens, sum(c.last.completion_tokens for c in choices))


async def complete(handle: RequestHandle, request_id: str, model: str,
                   shape: AnswerShape | None = None) -> ChatCompletionResponse:
    """The whole answer."""
    shape = shape or AnswerShape()
    choices = await gather(handle, shape.n)
    out = []
    for index, c in enumerate(choices):
        logprobs = None if c.logprobs is None else chat_logprobs(c.logprobs, shape.tokenizer, shape.tokens_as_ids)
        content, calls, finish_reason = "".join(c.text), [], c.last.finish_reason
        if shape.tool_calls is not None:
            content, calls, finish_reason = shape.tool_calls.message(content, finish_reason)
        message = ResponseMessage(role=shape.role, content=shape.echo + content if content is not None else None,
                                  tool_calls=calls)
        out.append(Choice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason,
                          stop_reason=c.last.stop_reason, token_ids=c.token_ids if shape.return_token_ids else None))
    return ChatCompletionResponse(id=request_id, model=model, usage=usage_of(choices), choices=out,
                                  prompt_token_ids=shape.prompt_token_ids, prompt_text=shape.prompt_text)


async def stream_chunks(handle: RequestHandle, request_id: str, model: str, include_usage: bool,
                        metrics: ServiceMetrics, shape: AnswerShape | None = None) -> AsyncIterator[bytes]:
    """The answer as SSE chunks: the role (and echo) of each choice, the text as it comes (with
    tools: content and tool-call deltas), the usage (when asked), [DONE]. An error after the stream
    started can only be told in the stream: its body, then [DONE]."""
    shape = shape or AnswerShape()
    created = int(time.time())
    frames = [ChunkFrame(request_id, created, model, index) for index in range(shape.n)]

    def chunk(choices: list[ChunkChoice], **extra) -> bytes:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **extra))

    for index in range(shape.n):
        first = {"prompt_token_ids": shape.prompt_token_ids, "prompt_text": shape.prompt_text} if index == 0 else {}
        yield chunk([ChunkChoice(index=index, delta=Delta(role=shape.role, content=""))], **first)
        if shape.echo:
            yield frames[index].render(shape.echo)
    prompt_tokens, generated, completed = 0, [0] * shape.n, {}
    parsers = [StreamingToolParser() for _ in range(shape.n)] if shape.tool_calls is not None else None
    texts = [""] * shape.n
    async for event in in_intervals(handle.__aiter__(), shape.stream_interval):
        if event.error is not None:
            count_error(metrics, event.error)
            yield sse_error(event.error)
            break
        if shape.plain and event.logprobs is None and event.stop_reason is None:  # the common case, per token
            if event.text or event.finish_reason:
                yield frames[event.index].render(event.text, event.finish_reason)
        else:
            generated[event.index] += len(event.token_ids)
            content, calls, finish_reason = event.text, [], event.finish_reason
            if parsers is not None:
                texts[event.index] += event.text
                content, calls, finish_reason = shape.tool_calls.stream_delta(parsers[event.index], texts[event.index],
                                                                              finish_reason)
            if not (content or calls or finish_reason or event.logprobs):
                continue
            logprobs = None if event.logprobs is None else \
                chat_logprobs(event.logprobs, shape.tokenizer, shape.tokens_as_ids)
            usage = Usage.count(prompt_tokens or handle.request.prompt_tokens, sum(generated)) \
                if shape.continuous_usage else None
            yield chunk([ChunkChoice(index=event.index, delta=Delta(content=content, tool_calls=calls),
                                     logprobs=logprobs, finish_reason=finish_reason, stop_reason=event.stop_reason,
                                     token_ids=event.token_ids if shape.return_token_ids else None)], usage=usage)
        if event.finish_reason is not None:
            prompt_tokens = event.prompt_tokens
            completed[event.index] = event.completion_tokens
    if include_usage and len(completed) == shape.n:
        yield chunk([], usage=Usage.count(prompt_tokens, sum(completed.values())))
    yield DONE
