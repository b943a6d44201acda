"""Server-sent events as vLLM's server sends a chat completion stream: one `data: <json>\\n\\n` per
chunk, an error as `data: {"error": ...}`, and `data: [DONE]\\n\\n` last."""
from __future__ import annotations

import json

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.responses import chat_chunk, token_choice, token_delta
from service.errors import ServiceError

DONE = b"data: [DONE]\n\n"

_json_str = json.JSONEncoder(ensure_ascii=False).encode  # escapes exactly as pydantic's JSON does


def sse(chunk: BaseModel) -> bytes:
    """A stream chunk as vLLM sends it: the fields it was built with (service/api/responses.py)."""
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n".encode()


def sse_error(error: ServiceError) -> bytes:
    return f"data: {json.dumps(error.to_dict())}\n\n".encode()


class ChunkFrame:
    """One stream's plain content chunks (text only: no logprobs, token ids or usage, not the last)
    as SSE bytes: pydantic renders the frame once, json only the text (a model + model_dump_json per
    token cost ~5x more, in the event loop's thread, under the GIL). The bytes are those of sse() of
    the chunk it stands for (tests/test_service_http_sse.py)."""

    _SLOT = "\x00"  # stands in for the text; id and model never hold a NUL

    def __init__(self, id: str, created: int, model: str, index: int = 0):
        frame = chat_chunk(id, created, model, [token_choice(index, token_delta(self._SLOT), None, None)])
        self._head, self._tail = frame.model_dump_json(exclude_unset=True).split('"\\u0000"')

    def render(self, text: str) -> bytes:
        return f"data: {self._head}{_json_str(text)}{self._tail}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that only sends: whoever sends it watches for the client's
    disconnect (service/api/cancellation.py), so Starlette's own second watcher is left out."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream_response(send)
