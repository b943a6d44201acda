"""Server-sent events as vLLM's server sends a chat completion stream: one `data: <json>\\n\\n` per
chunk, an error as `data: {"error": ...}`, and `data: [DONE]\\n\\n` last."""
from __future__ import annotations

import json

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.responses import ChatCompletionChunk, ChunkChoice, Delta
from service.errors import ServiceError

DONE = b"data: [DONE]\n\n"

_json_str = json.JSONEncoder(ensure_ascii=False).encode  # escapes exactly as pydantic's JSON does


def sse(body: BaseModel) -> bytes:
    return f"data: {body.model_dump_json()}\n\n".encode()


def sse_error(error: ServiceError) -> bytes:
    return f"data: {json.dumps(error.to_dict())}\n\n".encode()


class ChunkFrame:
    """One stream's content chunks as SSE bytes: pydantic renders the frame once, json only the text
    (a model + model_dump_json per token cost ~5x more, in the event loop's thread, under the GIL).
    The bytes are those of ChatCompletionChunk(...).model_dump_json() (tests/test_service_http_sse.py)."""

    _SLOT = "\x00"  # stands in for the text and the finish reason; id and model never hold a NUL

    def __init__(self, id: str, created: int, model: str, index: int = 0):
        frame = ChatCompletionChunk(id=id, created=created, model=model, choices=[
            ChunkChoice(index=index, delta=Delta(content=self._SLOT), finish_reason=self._SLOT)]).model_dump_json()
        self._head, self._middle, self._tail = frame.split('"\\u0000"')

    def render(self, text: str, finish_reason: str | None = None) -> bytes:
        reason = "null" if finish_reason is None else _json_str(finish_reason)
        return f"data: {self._head}{_json_str(text)}{self._middle}{reason}{self._tail}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that only sends: whoever sends it watches for the client's
    disconnect (service/api/cancellation.py), so Starlette's own second watcher is left out."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream_response(send)
