"""What goes into the engine and what comes out: prompts, requests, events, and the caller's handle."""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from service.engine.logits import PromptLogprobs, TokenLogprob
from service.engine.sampling import SamplingParams
from service.engine.stops import StopMatcher
from service.errors import ServiceError
from service.sizing import BLOCK_SIZE

if TYPE_CHECKING:
    from service.engine.structured import Grammar


@dataclass
class Prompt:
    """One tokenized prompt on the host, ready to prefill."""

    input_ids: torch.Tensor  # [L] long
    pixel_values: torch.Tensor | None = None  # the processor's patches of every image, in order
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    mrope_positions: torch.Tensor | None = None  # [3, L]; None: text positions 0..L-1
    rope_delta: int = 0  # next rotary position = length + rope_delta
    block_hashes: list[bytes] = field(default_factory=list)  # per full KV block, for the prefix cache
    text: str | None = None  # the text it was tokenized from (the chat template's output)

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
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the HTTP layer names its own (chatcmpl-, cmpl-)
    stop_matcher: StopMatcher | None = None  # built from params.stop once, off the scheduler thread
    grammar: Grammar | None = None  # structured output: every run (and choice) gets its own matcher

    def __post_init__(self) -> None:
        if self.stop_matcher is None and self.params.stop:
            self.stop_matcher = StopMatcher(self.params.stop)

    def new_stop_matcher(self) -> StopMatcher | None:
        """A matcher for one choice's text."""
        return None if self.stop_matcher is None else self.stop_matcher.fresh()

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.length

    @property
    def reserve(self) -> int:
        """KV tokens the request may fill: its prompt and every token it may generate (prepare keeps
        that within max_model_len). The last token is fed once more by the step already in flight
        when the row ends: it lands at position prompt + max_tokens - 1, inside the reservation.
        Each of n choices reserves as much (its prompt's full blocks shared: PagedKVCache.fork)."""
        return self.prompt_tokens + self.params.max_tokens


@dataclass
class Event:
    """A piece of one choice's output: text (and its tokens, with their logprobs when asked), and on
    the choice's last event finish_reason (or error), stop_reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    error: ServiceError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0  # the choice (n > 1)
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it
    token_ids: list[int] = field(default_factory=list)  # the tokens behind this piece of text
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs

    @property
    def last(self) -> bool:
        """The last event of its choice."""
        return self.finish_reason is not None or self.error is not None

    @staticmethod
    def joined(events: list["Event"]) -> "Event":
        """Consecutive events of one choice as one, in one pass (merging them pair by pair copied
        everything so far at each: quadratic in a backlog's length)."""
        if len(events) == 1:
            return events[0]
        first, last = events[0], events[-1]
        logprobs = None if all(e.logprobs is None for e in events) else \
            [entry for e in events for entry in e.logprobs or ()]
        return Event(text="".join(e.text for e in events), finish_reason=last.finish_reason,
                     prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                     index=first.index, stop_reason=last.stop_reason,
                     token_ids=[t for e in events for t in e.token_ids], logprobs=logprobs)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class RequestHandle:
    """The caller's side of a submitted request: iterate events (sync or async), or cancel. The
    events of its n choices interleave; iteration ends once every choice has ended, or at an error."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None,
                 on_cancel: Callable[["RequestHandle"], None] = lambda handle: None, arrived: float | None = None):
        self.request = request
        self.id = request.id
        self.arrived = time.monotonic() if arrived is None else arrived  # TTFT and latency count from here
        self.first_token_at: float | None = None
        self.prompt_logprobs: PromptLogprobs | None = None  # set before its first event, if the request asks for them
        self.choice_token_ids: list[list[int]] = [[] for _ in range(request.params.n)]
        self._open = request.params.n  # choices not ended yet (the reader's side)
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

    @property
    def token_ids(self) -> list[int]:
        """The first choice's tokens so far."""
        return self.choice_token_ids[0]

    def _ends(self, event: Event) -> bool:
        """Whether the reader has now seen the request's last event."""
        if event.error is not None:
            return True
        if event.finish_reason is not None:
            self._open -= 1
        return self._open <= 0

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
            if self._ends(event):
                return

    async def __aiter__(self):
        """Events as they come; when the reader has fallen behind, the text of all the events waiting
        is merged into one (fewer, larger chunks under load: the event loop keeps up)."""
        assert self._loop is not None, "submitted without a loop: use `for`"
        while True:
            waiting = [await self._queue.get()]
            following = None
            while not waiting[-1].last and not self._queue.empty():
                following = self._queue.get_nowait()
                if following.error is not None or following.index != waiting[0].index:
                    break
                waiting.append(following)
                following = None
            event = Event.joined(waiting)
            if following is not None:
                yield event
                event = following
            yield event
            if self._ends(event):
                return
