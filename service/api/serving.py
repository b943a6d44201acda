"""The serving layer, as vLLM's OpenAIServingChat: a chat request -> the engine's request and handle
-> one complete response or an SSE stream. No HTTP parsing here (routes.py) and no cancellation
(cancellation.py owns the handle's end)."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from starlette.responses import JSONResponse, Response

from service.api.cancellation import GenerationResponse
from service.api.error_handlers import count_error
from service.api.media import ImageLoader
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
from service.engine import Engine, Event, RequestHandle
from service.errors import ModelNotFound
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings


class ChatServing:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.images = ImageLoader(settings)

    async def create_chat_completion(self, chat: ChatCompletionRequest, engine: Engine,
                                     arrived: float) -> GenerationResponse:
        """The checks, the images and the prompt: every refusal of the request itself (400, 404, 413)
        comes from here; the queue's 429 comes when the response submits it."""
        self.check_model(chat.model)
        chat.check_supported()
        messages, urls = chat.chat_messages()
        engine.check_image_count(len(urls))  # before fetching or decoding any of them
        images = await self.images.load(urls)
        request = await asyncio.to_thread(engine.prepare, messages, images, **chat.to_sampling_fields())
        model = self.settings.model_name

        async def respond(handle: RequestHandle) -> Response:
            if chat.stream:
                return EventStreamResponse(stream_chunks(handle, request.id, model, chat.include_usage, self.metrics))
            return JSONResponse((await complete(handle, request.id, model)).model_dump())

        return GenerationResponse(engine, request, arrived, respond)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.settings.model_name, self.settings.model):
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")


async def complete(handle: RequestHandle, request_id: str, model: str) -> ChatCompletionResponse:
    """The whole answer; an error event is raised (the error handlers answer it)."""
    parts: list[str] = []
    async for event in handle:
        if event.error is not None:
            raise event.error
        parts.append(event.text)
        last = event
    return ChatCompletionResponse(
        id=request_id, model=model, usage=Usage.count(last.prompt_tokens, last.completion_tokens),
        choices=[Choice(message=ResponseMessage(content="".join(parts)), finish_reason=last.finish_reason)])


async def stream_chunks(handle: RequestHandle, request_id: str, model: str, include_usage: bool,
                        metrics: ServiceMetrics) -> AsyncIterator[bytes]:
    """The answer as SSE chunks: the role, the text as it comes, the usage (when asked), [DONE]. An
    error after the stream started can only be told in the stream: its body, then [DONE]."""
    created = int(time.time())
    frame = ChunkFrame(request_id, created, model)
    yield sse(ChatCompletionChunk(id=request_id, created=created, model=model,
                                  choices=[ChunkChoice(delta=Delta(role="assistant", content=""))]))
    last: Event | None = None
    async for event in handle:
        if event.error is not None:
            count_error(metrics, event.error)
            yield sse_error(event.error)
            break
        if event.text or event.finish_reason:
            yield frame.render(event.text, event.finish_reason)
        last = event
    if include_usage and last is not None and last.finish_reason is not None:
        usage = Usage.count(last.prompt_tokens, last.completion_tokens)
        yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage))
    yield DONE
