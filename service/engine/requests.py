"""What goes into the engine and what comes out: prompts, requests, events, and the caller's handle."""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from service.engine.sampling import SamplingParams
from service.errors import ServiceError
from service.sizing import BLOCK_SIZE


@dataclass
class Prompt:
    """One tokenized prompt on the host, ready to prefill."""

    input_ids: torch.Tensor  # [L] long
    pixel_values: torch.Tensor | None = None  # the processor's patches of every image, in order
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    mrope_positions: torch.Tensor | None = None  # [3, L]; None: text positions 0..L-1
    rope_delta: int = 0  # next rotary position = length + rope_delta
    block_hashes: list[bytes] = field(default_factory=list)  # per full KV block, for the prefix cache

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def shareable_hashes(self) -> list[bytes]:
        """The block hashes a prefill may take from the cache: at least its last token is computed
        (its logits give the first new token)."""
        return self.block_hashes[:(self.length - 1) // BLOCK_SIZE]


@dataclass
class GenerationRequest:
    prompt: Prompt
    params: SamplingParams
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.length

    @property
    def reserve(self) -> int:
        """KV tokens the request may fill: its prompt and every token it may generate (prepare keeps
        that within max_model_len). The last token is fed once more by the step already in flight
        when the row ends: it lands at position prompt + max_tokens - 1, inside the reservation."""
        return self.prompt_tokens + self.params.max_tokens


@dataclass
class Event:
    """A piece of a request's output: text, and on the last event finish_reason (or error) and usage."""

    text: str = ""
    finish_reason: str | None = None
    error: ServiceError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class RequestHandle:
    """The caller's side of a submitted request: iterate events (sync or async), or cancel."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None,
                 on_cancel: Callable[["RequestHandle"], None] = lambda handle: None, arrived: float | None = None):
        self.request = request
        self.id = request.id
        self.arrived = time.monotonic() if arrived is None else arrived  # TTFT and latency count from here
        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self._on_cancel = on_cancel
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Free the request's place: a queued request leaves the queue now, a running one at the next step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: Event) -> None:
        """Deliver an event (the engine's thread)."""
        if self._loop is None:
            self._queue.put(event)
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def __iter__(self) -> Iterator[Event]:
        assert self._loop is None, "submitted with a loop: use `async for`"
        while True:
            event = self._queue.get()
            yield event
            if event.last:
                return

    async def __aiter__(self):
        """Events as they come; when the reader has fallen behind, the text of all the events waiting
        is merged into one (fewer, larger chunks under load: the event loop keeps up)."""
        assert self._loop is not None, "submitted without a loop: use `for`"
        while True:
            event = await self._queue.get()
            while not event.last and not self._queue.empty():
                following = self._queue.get_nowait()
                if following.error is not None:
                    yield event
                    event = following
                    break
                event = Event(text=event.text + following.text, finish_reason=following.finish_reason,
                              prompt_tokens=following.prompt_tokens, completion_tokens=following.completion_tokens)
            yield event
            if event.last:
                return
