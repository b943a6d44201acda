"""The scheduler thread: a bounded queue of requests and one continuous batch on the device.

Each iteration: drop cancelled requests; start queued requests, in order, while the batch has rows
to spare, the KV cache has a slot and the blocks for their prompt and max_tokens, and the next
prefill pass has room (a prompt whose leading blocks a started prompt is computing waits for them,
to share them); run one prefill pass (up to one chunk of prompt tokens, pieces of several
prompts packed, service/decode/qwen3_prefill.py): the prompts it finishes sample their first token
and join the running rows; launch one decode step for every running row; read the previous step's
tokens while this one runs (the host never waits for a step it has not queued the next one
behind); stream text and retire finished rows. A step with structured-output rows is sampled only
after that read (their grammars need the previous token), still while its forward runs; steps
without such rows are sampled as they are launched. So running rows keep decoding while a wave of new
prompts is prefilled, pass by pass, and each prompt's first token comes as soon as its own prefill
is done. A cancelled request leaves at the next iteration. An error (CUDA out of memory) in a
prefill pass or its sampling fails only that pass's requests; anywhere else in an iteration (a
decode step) it fails every request the batch holds and frees it all. The loop goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
import time
from collections import deque

import torch

from service.engine.batch import Batch, PrefillFailed
from service.engine.logits import LogitsProcessors, PromptLogprobs, StepLogprobs, TokenLogprob
from service.engine.requests import Event, GenerationRequest, RequestHandle
from service.engine.sampling import on_device, sample
from service.engine.sequence import Sequence
from service.engine.structured import TokenMask
from service.errors import Cancelled, OutOfMemory, QueueFull, ServiceError, Unavailable
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"


class _Step:
    """A decode step launched on the device: its rows, their sampled tokens (and logprobs, where
    asked), and a host copy on the way. Launched with its logits only when some row has a grammar:
    `sampled` gives it its tokens later."""

    def __init__(self, rows: list[Sequence], tokens: torch.Tensor | None = None, logprobs: StepLogprobs | None = None,
                 logits: torch.Tensor | None = None):
        self.rows = rows
        self.logits = logits
        self.tokens: torch.Tensor | None = None
        if tokens is not None:
            self.sampled(tokens, logprobs)

    def sampled(self, tokens: torch.Tensor, logprobs: StepLogprobs | None = None) -> None:
        self.tokens, self.logprobs, self.logits = tokens, logprobs, None
        if logprobs is not None:
            logprobs.to_host()
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = tokens, None

    def host_tokens(self) -> list[int]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()

    def host_entries(self, tokens: list[int]) -> list[TokenLogprob | None]:
        return self.logprobs.entries(tokens) if self.logprobs is not None else [None] * len(tokens)


def sample_rows(logits: torch.Tensor, rows: list[Sequence], generated: list[int],
                grammar_mask: TokenMask | None = None) -> tuple[torch.Tensor, StepLogprobs | None]:
    """The next token of each row (`generated`: the tokens each had before it), with the logits
    processors of the rows that need them and the logprobs of those that asked. grammar_mask: the
    tokens the structured-output rows may take, applied first, as vLLM's model runner applies it
    (their logprobs see it too)."""
    if grammar_mask is not None:
        logits = grammar_mask.apply(logits)
    processors = LogitsProcessors.for_rows([row.logits_state for row in rows], generated)
    tokens = sample(logits, [row.params for row in rows], [row.generator for row in rows], processors)
    if processors is not None:
        processors.record(tokens)
    return tokens, StepLogprobs.gather(logits, [row.wants_logprobs for row in rows], tokens)


class Scheduler:
    def __init__(self, batch: Batch, settings: ServiceSettings, metrics: ServiceMetrics, tokenizer,
                 eos_ids: frozenset[int], max_model_len: int, vocab_size: int):
        self.batch = batch  # the tests' seam: a test may swap it (paused, nothing running) or wrap its methods
        self.settings = settings
        self.metrics = metrics
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        self._cv = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, RequestHandle]] = deque()
        self._rows: list[Sequence] = []
        self._inflight: _Step | None = None  # the decode step launched last, its tokens not read yet
        self._paused = False
        self._stopping = False
        self._ending: BaseException | None = None  # end_running's error: what still runs fails with it
        self._thread: threading.Thread | None = None
        self.max_batch_seen = 0  # the most rows one step decoded (benchmarks, tests)
        self._finished_at: deque[float] = deque(maxlen=64)  # when the last requests finished (Retry-After)

    # ---- the caller's side (any thread) ----------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlkit-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None,
               arrived: float | None = None) -> RequestHandle:
        handle = RequestHandle(request, loop, self._cancel, arrived)
        with self._cv:
            if self._stopping:
                raise Unavailable(SHUTTING_DOWN)
            if len(self._waiting) >= self.settings.max_queue:
                raise self._queue_full()
            self._waiting.append((request, handle))
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify_all()
        return handle

    def check_room(self, requests: int = 1) -> None:
        """QueueFull when `requests` more could not be queued even once the batch has started all the
        queued requests it has rows for: a refusal before their preparation (images decoded, chat
        template) that costs a full server nothing. Only a refusal that submit would give as the
        queue stands now (rows about to take queued requests count as room); submit checks again."""
        with self._cv:
            starting = 0 if self._paused else max(0, self.settings.max_batch_size - self.running)
            if len(self._waiting) - min(starting, len(self._waiting)) + requests > self.settings.max_queue:
                raise self._queue_full()

    def _queue_full(self) -> QueueFull:
        wait = self._drain_seconds()
        return QueueFull(f"The request queue is full ({self.settings.max_queue} waiting); retry "
                         + (f"in {wait} s." if wait else "later."), retry_after_s=wait)

    def _drain_seconds(self) -> int | None:
        """About how long the queue as it is takes to start, at the pace requests finished lately (1 to
        60 s: what a client's Retry-After may ask); None before enough have finished to tell."""
        done = self._finished_at
        if len(done) < 2 or done[-1] <= done[0]:
            return None
        pace = (len(done) - 1) / (done[-1] - done[0])  # requests finished a second
        return max(1, min(60, math.ceil(len(self._waiting) / pace)))

    def drain(self) -> None:
        """Refuse new requests and fail the queued ones (503); running ones go on."""
        with self._cv:
            self._stopping = True
            for _, handle in self._waiting:
                handle.push(Event(error=Unavailable(SHUTTING_DOWN)))
            self._waiting.clear()
            self.metrics.queue_depth.set(0)
            self._cv.notify_all()

    def end_running(self) -> None:
        """Drain, and fail every running request with a 503 at the next iteration (a shutdown's
        grace is over)."""
        self.drain()
        with self._cv:
            self._ending = Unavailable(f"{SHUTTING_DOWN}: the answer was cut off")
            self._cv.notify_all()

    def stop(self, timeout: float) -> None:
        """Drain, let running requests finish (up to `timeout`; then they end with a 503), then end
        the thread."""
        self.drain()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.end_running()
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

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in the batch: decoding, or started and prefilling (a request of n choices: n rows)."""
        return len(self._rows) + self.batch.starting_rows

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            for i, (_, queued) in enumerate(self._waiting):
                if queued is handle:
                    del self._waiting[i]
                    handle.push(Event(error=Cancelled("cancelled while queued")))
                    self.metrics.queue_depth.set(len(self._waiting))
                    self.metrics.requests.labels("cancelled").inc()
                    break
            self._cv.notify_all()

    # ---- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._rows and not self.batch.jobs and self._inflight is None \
                        and not (self._waiting and not self._paused) and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._rows and not self.batch.jobs and self._inflight is None:
                    return
            try:
                if self._ending is not None:
                    self._fail_all(self._ending)
                    continue
                self._drop_cancelled()
                if not self._paused:
                    self._admit()
                if self.batch.jobs:
                    self._prefill()
                # Pipelined: launch this step, then read the previous step's tokens while it runs.
                previous, self._inflight = self._inflight, None
                if self._rows:
                    self._inflight = self._launch_step(previous)
                if previous is not None:
                    self._collect_step(previous)
                if self._inflight is not None and self._inflight.tokens is None:
                    self._sample_grammar_step(self._inflight)
            except BaseException as exc:  # noqa: BLE001 - the loop must survive anything a request causes
                log.exception("engine step failed")
                self._fail_all(exc)

    def _drop_cancelled(self) -> None:
        gone = {i for i, row in enumerate(self._rows) if row.handle.cancelled}
        starting = [job.owner for job in self.batch.jobs if job.owner.handle.cancelled]
        for row in [self._rows[i] for i in gone] + starting:
            self.metrics.requests.labels("cancelled").inc()
            row.handle.push(Event(error=Cancelled("cancelled while running")))
        if starting:
            self.batch.drop(starting)
            self.metrics.running.set(self.running)
        if gone:
            self._retire(gone)

    def _admit(self) -> None:
        """Start queued requests, in order, while the batch has room and the next pass is not full."""
        while self._waiting and self.running + self._waiting[0][0].params.n <= self.settings.max_batch_size \
                and self.batch.prefill_tokens < self.batch.chunk:
            with self._cv:  # a racy peek is enough above: one queued now starts at the next iteration
                if not self._waiting:
                    break
                request, handle = self._waiting.popleft()
            try:  # everything of one request's start is its own: its error fails it alone
                row = Sequence.start(request, handle, self._tokenizer, self.batch.cache.device, self._eos_ids,
                                     self._max_model_len, self._vocab_size)
                started = self.batch.start(request, row, row.forks)
            except BaseException as exc:  # noqa: BLE001 - this request fails; the others go on
                self._fail([handle], exc)
                continue
            if not started:  # it waits, first in line, for blocks handed back or a shared prefix computed
                self._requeue([(request, handle)])
                break
            self.metrics.prompt_tokens.inc(request.prompt_tokens)
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(self.running)

    def _prefill(self) -> None:
        """One prefill pass; the prompts it finishes sample their first token and join the running rows."""
        running = len(self._rows)
        try:
            rows, logits, cached, prompt_logprobs = self.batch.prefill()
        except PrefillFailed as failed:
            self._fail([row.handle for row in failed.owners], failed.cause)
            self.metrics.running.set(self.running)
            return
        if not rows:
            return
        try:
            sampled, logprobs = sample_rows(torch.stack(logits), rows, [0] * len(rows),
                                            TokenMask.of([row.grammar for row in rows]))
            tokens = sampled.tolist()
            entries = logprobs.entries(tokens) if logprobs is not None else [None] * len(rows)
            for row, job in zip(rows, prompt_logprobs):  # on the handle before its first event
                if job is not None:
                    row.handle.prompt_logprobs = PromptLogprobs(row.request.prompt.input_ids,
                                                                *job.prompt_logprob_tensors)
        except BaseException as exc:  # noqa: BLE001 - these requests fail; the running ones go on
            self.batch.keep(list(range(running)))
            self._fail([row.handle for row in rows], exc)
            return
        # vLLM's: a prompt that skips the cache (prompt logprobs) is no query of it.
        self.metrics.prefix_cache_queries.inc(sum(row.prompt_tokens for row in rows
                                                  if row.index == 0 and row.params.prompt_logprobs is None))
        self.metrics.prefix_cache_hits.inc(cached)
        self._rows.extend(rows)
        for row, token, entry in zip(rows, tokens, entries):
            self._deliver(row, token, entry)
        done = {running + i for i, row in enumerate(rows) if row.finish_reason is not None}
        if done:
            self._retire(done)
        self.metrics.running.set(self.running)

    def _requeue(self, items: list[tuple[GenerationRequest, RequestHandle]]) -> None:
        with self._cv:
            if self._stopping:  # drained since they were taken from the queue
                for _, handle in items:
                    handle.push(Event(error=Unavailable(SHUTTING_DOWN)))
                return
            self._waiting.extendleft(reversed(items))  # first in line again
            self.metrics.queue_depth.set(len(self._waiting))

    def _launch_step(self, previous: _Step | None) -> _Step:
        """Queue one decode step and its sampling on the device; nothing here waits for the device.

        Each row's input is its last token: on the host (just prefilled, or read already), or still
        on the device as the previous step's output (not read yet). A row that the previous step
        finished is decoded once more here; that token is dropped when the step is collected.
        """
        rows = list(self._rows)
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        self.metrics.batch_size.observe(len(rows))
        where = {id(row): i for i, row in enumerate(previous.rows)} if previous is not None else {}
        pending = [where.get(id(row)) for row in rows]
        if all(i is None for i in pending):
            tokens_in: list[int] | torch.Tensor = [row.last_token for row in rows]
        elif pending == list(range(len(previous.rows))):
            tokens_in = previous.tokens
        else:  # rows that joined since (host tokens) follow the continuing rows (device tokens)
            carried = [i for i in pending if i is not None]
            joined = [row.last_token for row, i in zip(rows, pending) if i is None]
            assert pending == carried + [None] * len(joined), "joined rows come last"
            # Index lists go to the device without waiting for it (torch.tensor(..., device=cuda) would
            # wait for the step in flight).
            device = previous.tokens.device
            tokens_in = previous.tokens[on_device(carried, torch.long, device)]
            if joined:
                tokens_in = torch.cat([tokens_in, on_device(joined, previous.tokens.dtype, device)])
        logits = self.batch.decode(tokens_in)
        if any(row.grammar is not None for row in rows):
            return _Step(rows, logits=logits)  # sampled by _sample_grammar_step, once the grammars have the last tokens
        # A row still in the previous step (its token not read yet) has one more token than it counts.
        generated = [row.generated + (i is not None) for row, i in zip(rows, pending)]
        return _Step(rows, *sample_rows(logits, rows, generated))

    def _sample_grammar_step(self, step: _Step) -> None:
        """Sample a launched step that has grammar rows: the previous step's tokens have advanced their
        matchers (collected just now, while this step's forward runs); rows that left meanwhile get no mask."""
        mask = TokenMask.of([None if row.retired else row.grammar for row in step.rows])
        step.sampled(*sample_rows(step.logits, step.rows, [row.generated for row in step.rows], mask))

    def _collect_step(self, step: _Step) -> None:
        """Read a launched step's tokens (waiting for it if need be), stream them, retire finished rows."""
        tokens = step.host_tokens()
        for row, token, entry in zip(step.rows, tokens, step.host_entries(tokens)):
            if not row.retired:
                self._deliver(row, token, entry)
        done = {i for i, row in enumerate(self._rows) if row.finish_reason is not None}
        if done:
            self._retire(done)

    def _deliver(self, row: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """One new token for a row: its text to the caller; the request's metrics when it is the first or last."""
        event = row.append(token, logprob)
        self.metrics.generation_tokens.inc()
        handle = row.handle
        now = time.monotonic()
        if handle.first_token_at is None:
            handle.first_token_at = now
            self.metrics.ttft.observe(now - handle.arrived)
        elif row.last_token_at is not None:
            self.metrics.inter_token.observe(now - row.last_token_at)
        row.last_token_at = now
        if row.finish_reason is not None:
            self._finished_at.append(now)
            self.metrics.requests.labels(row.finish_reason).inc()
            self.metrics.latency.observe(time.monotonic() - handle.arrived)
        if event is not None:  # after the metrics: a caller that has the request's end finds it counted
            handle.push(event)

    def _retire(self, indices: set[int]) -> None:
        for i in indices:
            self._rows[i].retired = True
        keep = [i for i in range(len(self._rows)) if i not in indices]
        self._rows = [self._rows[i] for i in keep]
        self.batch.keep(keep)
        self.metrics.running.set(self.running)

    def _fail_all(self, exc: BaseException) -> None:
        rows, self._rows, self._inflight = self._rows + [job.owner for job in self.batch.jobs], [], None
        for row in rows:
            row.retired = True
        self.batch.release()
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
            handle.push(Event(error=error))
