"""The model engine: one scheduler thread owns the model and runs a continuous batch.

    engine = Engine.load(settings)             # or Engine(settings, loaded) with a model built elsewhere
    engine.start(); engine.warmup()
    req = engine.prepare(messages, images, max_tokens=64, temperature=0)   # CPU work, any thread
    handle = engine.submit(req)                 # bounded queue: QueueFull when it is full
    for event in handle: ...                    # text deltas, then one event with finish_reason
    engine.stop()

Each step of the scheduler: drop cancelled rows, admit waiting requests while the batch has slots and
the memory budget allows (their prompts are prefilled together and join the running batch), run one
decode step for every row, sample per row, stream text, retire finished rows. A cancelled request
(client gone) leaves at the next step boundary. Out-of-memory fails only the requests of the step
that hit it (503), frees the cache and the loop goes on. No HTTP here.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import torch

from service.batch import KVBatch, Prompt, RopeLayout
from service.detokenizer import IncrementalDetokenizer
from service.errors import Cancelled, InvalidRequest, OutOfMemory, QueueFull, ServiceError, Unavailable
from service.loading import LoadedModel, image_kwargs, load
from service.memory import MemoryBudget
from service.metrics import ServiceMetrics
from service.sampling import SamplingParams, make_generator, sample
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt: Prompt
    params: SamplingParams
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.length


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
                 on_cancel=lambda handle: None, arrived: float | None = None):
        self.request = request
        self._on_cancel = on_cancel
        self.id = request.id
        self.arrived = time.monotonic() if arrived is None else arrived  # TTFT and latency count from here
        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Free the slot: a queued request leaves the queue now, a running one at the next step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _push(self, event: Event) -> None:  # engine thread
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
        assert self._loop is not None, "submitted without a loop: use `for`"
        while True:
            event = await self._queue.get()
            yield event
            if event.last:
                return


@dataclass
class _Row:
    handle: RequestHandle
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    prompt_tokens: int
    generated: int = 0
    last_token: int = 0
    finish_reason: str | None = None


class Engine:
    def __init__(self, settings: ServiceSettings, loaded: LoadedModel, metrics: ServiceMetrics | None = None):
        self.settings = settings
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.model_path = loaded.path
        self.metrics = metrics or ServiceMetrics()
        self.layout = RopeLayout(self.model)
        self._image_kwargs = image_kwargs(self.processor, settings)
        self._text_config = self.model.config.get_text_config()
        model_max = getattr(self._text_config, "max_position_embeddings", None) or settings.max_model_len
        self.max_model_len = min(settings.max_model_len, model_max)
        self._eos_ids = self._find_eos_ids()
        self._defaults = self._sampling_defaults()
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.memory = MemoryBudget(self.model, self.device, self.dtype, settings.memory_budget_gib)

        self._cv = threading.Condition()
        self._waiting: list[tuple[GenerationRequest, RequestHandle]] = []
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fault: BaseException | None = None
        self.ready = False
        self.max_batch_seen = 0

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    def load(cls, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> "Engine":
        return cls(settings, load(settings), metrics)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlkit-engine", daemon=True)
            self._thread.start()

    def warmup(self) -> None:
        """One short request through the whole path (image included when the model takes images)."""
        content: list[dict] = [{"type": "text", "text": "Describe the image."}]
        images = []
        if self.settings.max_images_per_request > 0 and hasattr(self.processor, "image_processor"):
            from PIL import Image

            images = [Image.new("RGB", (64, 64), (127, 127, 127))]
            content.insert(0, {"type": "image"})
        request = self.prepare([{"role": "user", "content": content}], images, max_tokens=2, temperature=0.0)
        self.generate(request)
        self.ready = True
        self.metrics.ready.set(1)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to `timeout`), then end the thread."""
        with self._cv:
            self._stopping = True
            self.ready = False
            self.metrics.ready.set(0)
            for _, handle in self._waiting:
                handle._push(Event(error=Unavailable("the server is shutting down")))
            self._waiting.clear()
            self.metrics.queue_depth.set(0)
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                for row in list(self._rows):
                    row.handle.cancel()
                self._thread.join(5)

    @contextlib.contextmanager
    def paused(self):
        """Hold new requests in the queue (running ones continue): maintenance, and deterministic tests."""
        with self._cv:
            self._paused = True
        try:
            yield
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify_all()

    def fail_next_forward(self, exc: BaseException) -> None:
        """Make the next model forward raise `exc` (drives the out-of-memory path without a GPU in tests)."""
        self._fault = exc

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ---- requests ----------------------------------------------------------------------------
    def prepare(self, messages: list[dict], images: list, *, max_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                seed: int | None = None, stop: tuple[str, ...] | list[str] = (),
                ignore_eos: bool = False) -> GenerationRequest:
        """Chat messages (HF format, images as {"type": "image"} parts) + PIL images -> a request.

        CPU only (chat template, image processor, positions): call it from any thread.
        Raises InvalidRequest for too many images or a prompt that does not fit the context.
        """
        if len(images) > self.settings.max_images_per_request:
            raise InvalidRequest(
                f"At most {self.settings.max_images_per_request} image(s) may be provided in one request; got {len(images)}.",
                param="messages", kind="too_many_images")
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt",
                                    **(self._image_kwargs if images else {}))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(f"cannot build the prompt: {exc}", param="messages") from exc
        input_ids = inputs["input_ids"][0]
        length = int(input_ids.shape[0])
        if length >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{length} input tokens (text and images). Please reduce the length of the messages or images.",
                param="messages", kind="prompt_too_long")
        room = self.max_model_len - length
        if max_tokens is None:
            max_tokens = min(self.settings.max_tokens_default, room)
        elif length + max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{length + max_tokens} tokens ({length} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens", kind="prompt_too_long")
        token_keys = {k for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                      and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == inputs["input_ids"].shape}
        token_extras = {k: inputs[k][0] for k in token_keys}
        extras = {k: v for k, v in inputs.items() if k not in token_keys | {"input_ids", "attention_mask"}
                  and isinstance(v, torch.Tensor)}
        mrope, delta = self.layout.prompt_positions(input_ids, extras, token_extras)
        d = self._defaults
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=d["temperature"] if temperature is None else temperature,
            top_p=d["top_p"] if top_p is None else top_p,
            top_k=d["top_k"] if top_k is None else top_k,
            seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
        )
        prompt = Prompt(input_ids=input_ids, extras=extras, token_extras=token_extras,
                        mrope_positions=mrope, rope_delta=delta)
        return GenerationRequest(prompt=prompt, params=params)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None,
               arrived: float | None = None) -> RequestHandle:
        """Queue a request (the same request may be submitted many times).

        loop: deliver events to that asyncio loop (else iterate the handle synchronously).
        arrived: time.monotonic() when the request arrived (default: now), for TTFT and latency.
        """
        handle = RequestHandle(request, loop, self._cancel, arrived)
        with self._cv:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull(f"The request queue is full ({self.settings.max_queue} waiting); retry later.")
            self._waiting.append((request, handle))
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify_all()
        return handle

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit and wait (blocking helper for warm-up, scripts and benchmarks)."""
        handle = self.submit(request)
        parts: list[str] = []
        for event in handle:
            if event.error is not None:
                raise event.error
            parts.append(event.text)
            if event.finish_reason is not None:
                return Completion("".join(parts), event.finish_reason, event.prompt_tokens,
                                  event.completion_tokens, handle.token_ids)
        raise RuntimeError("unreachable")

    # ---- scheduler thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._rows and not (self._waiting and not self._paused) and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._rows:
                    return
            try:
                self._drop_cancelled()
                if not self._paused:
                    self._admit()
                if self._rows:
                    self._decode_step()
            except BaseException as exc:  # noqa: BLE001 - the loop must survive anything a request causes
                log.exception("engine step failed")
                self._fail_all(exc)

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            for i, (_, queued) in enumerate(self._waiting):
                if queued is handle:
                    del self._waiting[i]
                    handle._push(Event(error=Cancelled("cancelled while queued")))
                    self.metrics.queue_depth.set(len(self._waiting))
                    self.metrics.requests.labels("cancelled").inc()
                    break
            self._cv.notify_all()

    def _model_forward(self, **kwargs):
        if self._fault is not None:
            fault, self._fault = self._fault, None
            raise fault
        return self.model(**kwargs)

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._rows) if row.handle.cancelled]
        if gone:
            for i in gone:
                self.metrics.requests.labels("cancelled").inc()
                self._rows[i].handle._push(Event(error=Cancelled("cancelled while running")))
            self._retire(set(gone))

    def _admit(self) -> None:
        free = self.settings.max_batch_size - len(self._rows)
        if free <= 0:
            return
        running = [(int(p), row.params.max_tokens - row.generated)
                   for p, row in zip(self._batch.next_pos.tolist() if self._batch else [], self._rows)]
        taken: list[tuple[GenerationRequest, RequestHandle]] = []
        with self._cv:
            while self._waiting and len(taken) < free:
                request, handle = self._waiting[0]
                new = [(r.prompt_tokens, r.params.max_tokens) for r, _ in taken + [(request, handle)]]
                if (running or taken) and not self.memory.fits(running, new):
                    break  # waits for memory; an empty batch always takes the head so nothing starves
                taken.append(self._waiting.pop(0))
            self.metrics.queue_depth.set(len(self._waiting))
        if not taken:
            return
        try:
            batch, logits = KVBatch.prefill(self._model_forward, self.layout, self.device, self._text_config,
                                            [r.prompt for r, _ in taken], self._pad_id)
            rows = [self._new_row(r, h) for r, h in taken]
            for r, _ in taken:
                self.metrics.prompt_tokens.inc(r.prompt_tokens)
            tokens = sample(logits, [row.params for row in rows], [row.generator for row in rows]).tolist()
        except BaseException as exc:  # noqa: BLE001
            self._fail([h for _, h in taken], exc)
            return
        for row, token in zip(rows, tokens):
            self._accept(row, token)
        finished = {i for i, row in enumerate(rows) if row.finish_reason is not None}
        if len(finished) == len(rows):
            return
        if finished:
            batch.keep([i for i in range(len(rows)) if i not in finished])
            rows = [row for i, row in enumerate(rows) if i not in finished]
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.merge(batch)
        self._rows.extend(rows)
        self.metrics.running.set(len(self._rows))

    def _new_row(self, request: GenerationRequest, handle: RequestHandle) -> _Row:
        return _Row(handle=handle, params=request.params,
                    detok=IncrementalDetokenizer(self.tokenizer, request.params.stop),
                    generator=make_generator(request.params, self.device), prompt_tokens=request.prompt_tokens)

    def _decode_step(self) -> None:
        rows = self._rows
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        self.metrics.batch_size.observe(len(rows))
        tokens_in = torch.tensor([row.last_token for row in rows], device=self.device)
        try:
            logits = self._batch.decode(tokens_in)
            tokens = sample(logits, [row.params for row in rows], [row.generator for row in rows]).tolist()
        except BaseException as exc:  # noqa: BLE001
            self._fail_all(exc)
            return
        for row, token in zip(rows, tokens):
            self._accept(row, token)
        done = {i for i, row in enumerate(rows) if row.finish_reason is not None}
        if done:
            self._retire(done)

    def _accept(self, row: _Row, token: int) -> None:
        """One new token for a row: stream its text; decide whether the row is finished."""
        handle = row.handle
        row.generated += 1
        row.last_token = token
        handle.token_ids.append(token)
        self.metrics.generation_tokens.inc()
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
            self.metrics.ttft.observe(handle.first_token_at - handle.arrived)
        if token in self._eos_ids and not row.params.ignore_eos:
            row.finish_reason = "stop"
            text = row.detok.flush()
        else:
            text = row.detok.add(token)
            if row.detok.stopped:
                row.finish_reason = "stop"
            elif row.generated >= row.params.max_tokens or row.prompt_tokens + row.generated >= self.max_model_len:
                row.finish_reason = "length"
                text += row.detok.flush()
        if row.finish_reason is None:
            if text:
                handle._push(Event(text=text))
            return
        handle._push(Event(text=text, finish_reason=row.finish_reason, prompt_tokens=row.prompt_tokens,
                           completion_tokens=row.generated))
        self.metrics.requests.labels(row.finish_reason).inc()
        self.metrics.latency.observe(time.monotonic() - handle.arrived)

    def _retire(self, indices: set[int]) -> None:
        keep = [i for i in range(len(self._rows)) if i not in indices]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        else:
            self._batch.keep(keep)
        self.metrics.running.set(len(self._rows))

    def _fail_all(self, exc: BaseException) -> None:
        rows, self._rows, self._batch = self._rows, [], None
        self.metrics.running.set(0)
        self._fail([row.handle for row in rows], exc)

    def _fail(self, handles: list[RequestHandle], exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            error: ServiceError = OutOfMemory(
                "The GPU ran out of memory for this batch; its requests were dropped and the memory freed. "
                "Retry, or lower max_tokens, image size or concurrency.")
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif isinstance(exc, ServiceError):
            error = exc
        else:
            error = ServiceError(f"internal error while generating: {type(exc).__name__}: {exc}")
        log.warning("failing %d request(s): %s", len(handles), error.message)
        for handle in handles:
            handle._push(Event(error=error))

    # ---- model facts ------------------------------------------------------------------------------
    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids

    def _sampling_defaults(self) -> dict:
        """Request defaults from the model's generation config, as vLLM does; OpenAI's otherwise."""
        gen = getattr(self.model, "generation_config", None)
        sampled = bool(getattr(gen, "do_sample", False))
        return {
            "temperature": float(getattr(gen, "temperature", None) or 1.0) if sampled else 1.0,
            "top_p": float(getattr(gen, "top_p", None) or 1.0) if sampled else 1.0,
            "top_k": int(getattr(gen, "top_k", None) or 0) if sampled else 0,
        }
