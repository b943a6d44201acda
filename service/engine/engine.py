"""The engine's front: load once, then prepare, submit and stream requests. No HTTP here.

    engine = Engine.load(settings)             # or Engine(settings, loaded) with a model built elsewhere
    engine.start()                             # the scheduler thread, one warm-up request: ready
    req = engine.prepare(messages, images, max_tokens=64, temperature=0)   # CPU work, any thread
    grammar = engine.compile_grammar(Constraint("json", schema_text))       # structured output: any thread, cached
    req = engine.prepare(messages, images, grammar=grammar, tools=[...])  # the answer follows the grammar
    engine.check_queue_room()                   # QueueFull at once when the queue is full (before preparing)
    handle = engine.submit(req)                 # bounded queue: QueueFull when it is full
    for event in handle: ...                    # text deltas, then one event with finish_reason
    engine.stop()

Where the work is: prompts.py (a request from messages and images), startup.py (the memory plan,
compiled decode step, CUDA graphs), scheduler.py (the queue and the continuous batch),
batch.py (the rows on the device: the one owner of the KV cache), sequence.py (one request's
tokens and text), structured.py (grammars and their token masks).
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from service.decode import Qwen3VLDecoder
from service.engine.loading import LoadedModel, check_context, load
from service.engine.memory import ProcessMemory
from service.engine.prompts import PromptBuilder
from service.engine.requests import Completion, GenerationRequest, RequestHandle
from service.engine.scheduler import Scheduler
from service.engine.startup import build_batch, configure_torch, limit_cpu_threads
from service.engine.structured import Constraint, Grammar, GrammarCompiler
from service.errors import InvalidRequest, ModelUnavailable
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

# The scheduler thread waits for the device with the GIL released and must get it back at once:
# with Python's default 5 ms switch interval, a busy HTTP thread (streaming many chunks) would hold
# each decode step back by up to a whole step.
SWITCH_INTERVAL_S = 0.0005


class Engine:
    def __init__(self, settings: ServiceSettings, loaded: LoadedModel, metrics: ServiceMetrics | None = None, *,
                 process_memory: ProcessMemory | None = None):
        """process_memory: made before the model touched the GPU (Engine.load does this), so that
        NVML's figures can be told apart from other processes'."""
        if not Qwen3VLDecoder.supports(loaded.model):
            raise ModelUnavailable(f"{type(loaded.model).__name__} is not a Qwen3-VL (dense) model: this engine "
                                   "serves the Qwen3-VL family (Qwen/Qwen3-VL-2B/4B/8B Instruct and Thinking)")
        self.settings = settings
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self.device = loaded.device
        self.dtype = loaded.dtype
        limit_cpu_threads(self.device)
        self.metrics = metrics or ServiceMetrics(settings.model_name)
        check_context(self.model.config, settings)  # a model loaded elsewhere (benchmarks) is checked here
        self.max_model_len = settings.max_model_len
        self.prompts = PromptBuilder(self.model, self.processor, settings, self.max_model_len)
        if process_memory is None and self.device.type == "cuda":
            process_memory = ProcessMemory(self.device.index or 0)
        self.startup_seconds: dict[str, float] = {}
        batch, self.plan = build_batch(self.model, self.prompts.largest(), settings, self.max_model_len, self.dtype,
                                       self.device, process_memory, self.startup_seconds)
        eos_ids = self._eos_ids()
        self.scheduler = Scheduler(batch, settings, self.metrics, self.tokenizer, eos_ids, self.max_model_len,
                                   self.prompts.vocab_size)
        self.grammars = GrammarCompiler(self.tokenizer, self.prompts.vocab_size, eos_ids)
        cache = batch.cache
        self.metrics.kv_cache_usage.set_function(lambda: 1 - cache.free_blocks / max(cache.num_blocks, 1))
        self.ready = False

    @classmethod
    def load(cls, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> "Engine":
        configure_torch(settings)
        process_memory = ProcessMemory() if settings.device != "cpu" else None
        started = time.perf_counter()
        loaded = load(settings)
        loaded_at = time.perf_counter()
        engine = cls(settings, loaded, metrics, process_memory=process_memory)
        engine.startup_seconds = {"load": loaded_at - started, **engine.startup_seconds}
        return engine

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, warmup: bool | None = None) -> None:
        """Start the scheduler thread; then (``warmup``, default: the setting) run one short request
        through the whole path. The engine is ready (``ready``, the ready gauge) once this returns."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.scheduler.start()
        if self.settings.warmup if warmup is None else warmup:
            # No client's request: counted in metrics of its own, then dropped (vLLM's start at zero too).
            self.scheduler.metrics = ServiceMetrics(self.settings.model_name)
            try:
                self.generate(self.prompts.warmup_request())
            finally:
                self.scheduler.metrics = self.metrics
        self.ready = True
        self.metrics.ready.set(1)

    def drain(self) -> None:
        """Not ready; refuse new requests and fail the queued ones (503); running ones go on (the
        start of a graceful shutdown)."""
        self.ready = False
        self.metrics.ready.set(0)
        self.scheduler.drain()

    def end_running(self) -> None:
        """Drain, and end the running requests with a 503 (a graceful shutdown's grace is over)."""
        self.drain()
        self.scheduler.end_running()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, let running requests finish (up to `timeout`; then they end with a 503), then end
        the thread."""
        self.drain()
        self.scheduler.stop(timeout)

    def paused(self) -> contextlib.AbstractContextManager:
        """Hold new requests in the queue (running ones continue): maintenance, and deterministic tests."""
        return self.scheduler.paused()

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def running(self) -> int:
        return self.scheduler.running

    # ---- requests --------------------------------------------------------------------------------
    def check_queue_room(self, requests: int = 1) -> None:
        """QueueFull when the queue could not take `requests` more (callers check before preparing
        them: a full server refuses for free; submit checks again)."""
        self.scheduler.check_room(requests)

    def check_image_count(self, count: int) -> None:
        """InvalidRequest when a request brings more images than the settings admit (callers check
        before decoding them; prepare checks again)."""
        self.prompts.check_image_count(count)

    def prepare(self, messages: list[dict], images: list, *, grammar: Grammar | None = None,
                **options) -> GenerationRequest:
        """Chat messages (HF format, images as {"type": "image"} parts) + PIL images -> a request.

        CPU only (chat template, image processor, positions): call it from any thread. ``options``:
        SamplingParams fields (max_tokens, temperature, ...; None takes the model's default), and
        the prompt's (PromptBuilder.request: chat_template_kwargs, add_generation_prompt, tools, ...).
        grammar: what the answer must match (`compile_grammar`). Raises InvalidRequest for anything
        about the request that cannot be served.
        """
        return self._admissible(self.prompts.request(messages, images, **options), grammar)

    def compile_grammar(self, constraint: Constraint) -> Grammar:
        """A structured-output constraint compiled for this tokenizer (cached; any thread, CPU only).
        Raises InvalidRequest naming the constraint's field when it does not compile."""
        return self.grammars.compile(constraint)

    def prepare_tokens(self, token_ids: list[int], *, grammar: Grammar | None = None, **options) -> GenerationRequest:
        """A text prompt given as token ids (/v1/completions) -> a request (PromptBuilder.request_tokens)."""
        return self._admissible(self.prompts.request_tokens(token_ids, **options), grammar)

    def prepare_text(self, text: str, *, grammar: Grammar | None = None, **options) -> GenerationRequest:
        """A plain text prompt (/v1/completions: no chat template) -> a request (PromptBuilder.request_text)."""
        return self._admissible(self.prompts.request_text(text, **options), grammar)

    def _admissible(self, request: GenerationRequest, grammar: Grammar | None = None) -> GenerationRequest:
        """The request with its grammar; InvalidRequest for one the KV cache could never hold (it
        would wait for ever)."""
        cache = self.scheduler.batch.cache
        n = request.params.n
        if not cache.fits_at_all(request.reserve, n - 1, request.prompt_tokens):
            raise InvalidRequest(f"n={n} choices of up to {request.reserve} tokens each need more KV cache than this "
                                 f"server has ({cache.num_blocks * cache.block_size} tokens); lower n or max_tokens.",
                                 param="n", kind="invalid_sampling")
        request.grammar = grammar
        return request

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None,
               arrived: float | None = None) -> RequestHandle:
        """Queue a request (the same request may be submitted many times).

        loop: deliver events to that asyncio loop (else iterate the handle synchronously).
        arrived: time.monotonic() when the request arrived (default: now), for TTFT and latency.
        """
        return self.scheduler.submit(request, loop, arrived)

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit and wait (blocking helper for warm-up, scripts and benchmarks)."""
        handle = self.submit(request)
        parts: list[str] = []
        for event in handle:
            if event.error is not None:
                raise event.error
            parts.append(event.text)
            if event.finish_reason is not None:
                return Completion("".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                  handle.token_ids)
        raise RuntimeError("unreachable")

    # ---- model facts -----------------------------------------------------------------------------
    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return frozenset(ids)
