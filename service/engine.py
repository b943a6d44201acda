"""The model engine: one scheduler thread owns the model and runs a continuous batch.

    engine = Engine.load(settings)             # or Engine(settings, loaded) with a model built elsewhere
    engine.start()                             # scheduler thread + one warm-up request: ready
    req = engine.prepare(messages, images, max_tokens=64, temperature=0)   # CPU work, any thread
    handle = engine.submit(req)                 # bounded queue: QueueFull when it is full
    for event in handle: ...                    # text deltas, then one event with finish_reason
    engine.stop()

Each step of the scheduler: drop cancelled rows, admit waiting requests while the batch has slots and
the memory budget allows (their prompts are prefilled together and join the running batch), run one
decode step for every row, sample per row, stream text, retire finished rows. A cancelled request
(client gone) leaves at the next step boundary. Out-of-memory fails only the requests of the step
that hit it (503), frees the cache and the loop goes on. No HTTP here.

Decoding (service/batch.py): Qwen3-VL models decode from a paged KV cache with our own step,
replayed from CUDA graphs on CUDA; the cache is sized at start-up from the memory budget after
measuring a prefill of the largest admissible request (service/memory.py), so admission is "a slot
and the blocks for prompt + max_tokens are free". Other models decode through transformers' forward
with an estimated budget.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import queue
import sys
import threading
import time
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from service.batch import KVBatch, Prompt, RopeLayout, SlotBatch
from service.decode import BLOCK_SIZE, DecodeRunner, PagedKVCache, Qwen3VLDecoder
from service.decode.cache import blocks_for, image_digest, prompt_block_hashes
from service.decode.qwen3_prefill import Qwen3VLPrefill
from service.decode.qwen3_step import fuse_linear_weights, text_model_of
from service.detokenizer import IncrementalDetokenizer
from service.errors import (Cancelled, InvalidRequest, ModelUnavailable, OutOfMemory, QueueFull, ServiceError,
                            Unavailable)
from service.loading import LoadedModel, image_kwargs, load
from service.memory import GIB, KVPlan, MemoryBudget, ProcessMemory, plan_kv_blocks
from service.metrics import ServiceMetrics
from service.sampling import SamplingParams, make_generator, sample
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "vlkit" / "compile"


def configure_torch(settings: ServiceSettings) -> Path:
    """Environment torch reads lazily; call before the process first touches CUDA.

    - The allocator grows expandable segments instead of fixed blocks, so prefills of changing
      sizes do not fragment the memory the budget counts (the user's own setting wins).
    - TorchInductor and Triton keep compiled kernels in one directory that survives restarts
      (a volume in the container), so start-up after the first only loads them.
    - Attention (prefill, vision tower) never goes to cuDNN's SDPA: it builds a plan for every new
      shape, and prompt lengths and image sizes change with every request; flash and memory-
      efficient attention are ready-made kernels.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.backends.cuda.enable_cudnn_sdp(False)
    root = Path(settings.compile_cache_dir or os.environ.get("VLKIT_COMPILE_CACHE_DIR") or DEFAULT_COMPILE_CACHE)
    if settings.compile_cache_dir is not None or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    if settings.compile_cache_dir is not None or "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return root


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
    retired: bool = False  # left the batch (finished, cancelled, failed): a step still in flight skips it


class _Step:
    """A decode step launched on the device: its rows, their sampled tokens, and a host copy on the way."""

    def __init__(self, rows: list[_Row], tokens: torch.Tensor, device: torch.device):
        self.rows = rows
        self.tokens = tokens
        if device.type == "cuda":
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


class Engine:
    def __init__(self, settings: ServiceSettings, loaded: LoadedModel, metrics: ServiceMetrics | None = None, *,
                 process_memory: ProcessMemory | None = None, static_cache: bool | None = None):
        """static_cache: decode from the paged cache with our own step (default: when the model is a
        Qwen3-VL); False keeps transformers' forward. process_memory: made before the model touched
        the GPU (Engine.load does this), so that NVML figures can be told apart from other processes."""
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
        self.process_memory = process_memory
        self.runner: DecodeRunner | None = None
        self.plan: KVPlan | None = None
        self.startup_seconds: dict[str, float] = {}
        self._reserved_ceiling: int | None = None
        if static_cache is None:
            static_cache = Qwen3VLDecoder.supports(self.model)
        if static_cache:
            self._setup_static_decoding()

        self._cv = threading.Condition()
        self._waiting: list[tuple[GenerationRequest, RequestHandle]] = []
        self._rows: list[_Row] = []
        self._batch: KVBatch | SlotBatch | None = None
        self._inflight: _Step | None = None  # the decode step launched last, its tokens not read yet
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fault: BaseException | None = None
        self.ready = False
        self.max_batch_seen = 0

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    def load(cls, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> "Engine":
        configure_torch(settings)
        process_memory = ProcessMemory() if settings.device != "cpu" else None
        started = time.perf_counter()
        loaded = load(settings)
        engine = cls(settings, loaded, metrics, process_memory=process_memory)
        engine.startup_seconds = {"load": time.perf_counter() - started - sum(engine.startup_seconds.values()),
                                  **engine.startup_seconds}
        return engine

    # ---- the paged KV cache: sizing, graphs ----------------------------------------------------
    def _setup_static_decoding(self) -> None:
        """Size the paged KV cache from the budget, build the decode step, compile and capture it."""
        settings, on_cuda = self.settings, self.device.type == "cuda"
        started = time.perf_counter()
        if on_cuda:  # q/k/v and gate/up as one matmul each: in place, before memory is measured
            for layer in text_model_of(self.model).layers:
                fuse_linear_weights([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                fuse_linear_weights([layer.mlp.gate_proj, layer.mlp.up_proj])
        blocks = None  # CPU: room for max_batch_size sequences of max_model_len (system RAM is not budgeted)
        if on_cuda:
            blocks = self._plan_memory()
        cache = PagedKVCache(self.model.config, settings.max_batch_size, self.max_model_len, blocks,
                             dtype=self.dtype, device=self.device)
        decoder = Qwen3VLDecoder(self.model, cache, fuse_projections=on_cuda,
                                 compile_backend="inductor" if on_cuda and settings.compile else None)
        # The Triton attention ends blocks past each row's length at once: coarse context buckets
        # (fewer graphs to capture) cost little there.
        step = 512 if decoder.attention == "triton" else 256
        self.runner = DecodeRunner(decoder, batch_sizes=(1, 2, 4, 8, 16, 32), context_step=step)
        self.startup_seconds["memory plan"] = time.perf_counter() - started
        if on_cuda:
            started = time.perf_counter()
            if settings.cuda_graphs:
                self.runner.capture()  # its warm-up runs compile each batch size first
                if self.runner.capture_error:
                    log.warning("decoding without CUDA graphs: %s", self.runner.capture_error)
            else:
                self.runner.warm_up()
            torch.cuda.synchronize(self.device)
            self.startup_seconds["compile + graphs"] = time.perf_counter() - started
            self._reserved_ceiling = torch.cuda.memory_reserved(self.device) + self.plan.prefill_peak
            used = self.process_memory.used() if self.process_memory else 0
            log.info("%s; process now %.2f GiB (NVML), %d decode graphs", self.plan.describe(), used / GIB,
                     len(self.runner.graphs))

    def _plan_memory(self) -> int:
        """Measure the largest request's prefill, then fit as many KV blocks as the budget allows.

        The prefill runs image by image and chunk by chunk, so the largest request (the most images
        of max_pixels, text up to max_model_len) bounds the activations of every prefill."""
        settings = self.settings
        prompt = self._largest_prompt()
        try:
            peak = self._prefill_peak(prompt)
        except torch.cuda.OutOfMemoryError:
            raise ModelUnavailable(
                f"the largest request this configuration admits ({prompt.length} tokens with "
                f"{self._count_images(prompt)} image(s) of up to {settings.max_pixels} pixels) does not fit the GPU: "
                "lower --max-model-len, --max-pixels or --max-images-per-request, or use --quantization nf4") from None
        resident = self._process_used()
        block_bytes = PagedKVCache.bytes_per_token(self.model.config, self.dtype) * BLOCK_SIZE
        self.plan = plan_kv_blocks(budget_bytes=int(settings.memory_budget_gib * GIB), resident_bytes=resident,
                                   prefill_peak_bytes=peak, block_bytes=block_bytes, block_size=BLOCK_SIZE,
                                   max_len=self.max_model_len, max_sequences=settings.max_batch_size)
        if self.plan.full_sequences < 1:
            need = (blocks_for(self.max_model_len) + 1) * block_bytes  # + the scratch block
            raise ModelUnavailable(
                f"--memory-budget-gib {settings.memory_budget_gib} leaves no room for one sequence of "
                f"--max-model-len {self.max_model_len} tokens ({need / GIB:.2f} GiB of KV cache): "
                f"{self.plan.describe()}. Lower --max-model-len, --max-pixels or --max-images-per-request, "
                "use --quantization nf4, or raise the budget if the card has room")
        return self.plan.blocks

    def _process_used(self) -> int:
        """This process's GPU memory (NVML where it tells; else torch's share plus a typical context)."""
        if self.process_memory is not None:
            return self.process_memory.used()
        return torch.cuda.memory_reserved(self.device) + 600 * 1024**2

    def _prefill_peak(self, prompt: Prompt) -> int:
        """Bytes the prefill of this prompt adds at its peak (torch's peak, or what NVML saw grow),
        beyond the K/V it writes: it runs into a pool of its own, made before measuring."""
        pool = PagedKVCache(self.model.config, 1, self.max_model_len, dtype=self.dtype, device=self.device)
        decoder = Qwen3VLDecoder(self.model, pool, fuse_projections=self.device.type == "cuda")
        slot = pool.allocate(prompt.length)
        prefiller = Qwen3VLPrefill(self.model, decoder)

        def run() -> None:
            prefiller.prefill(slot, prompt.input_ids, prompt.mrope_positions, prompt.rope_delta,
                              prompt.extras.get("pixel_values"), prompt.extras.get("image_grid_thw"))
            torch.cuda.synchronize(self.device)

        # Once first: kernels and library workspaces loaded at their first use stay resident (they
        # are counted there); the second run shows what a prefill itself adds.
        run()
        gc.collect()
        torch.cuda.empty_cache()
        allocated, reserved = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
        used = self._process_used()
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        peak = max(torch.cuda.max_memory_allocated(self.device) - allocated,
                   torch.cuda.max_memory_reserved(self.device) - reserved, self._process_used() - used)
        del pool, decoder, prefiller
        gc.collect()
        torch.cuda.empty_cache()
        log.info("prefill of %d tokens with %d image(s): peak %.2f GiB", prompt.length, self._count_images(prompt),
                 peak / GIB)
        return peak

    def _largest_prompt(self) -> Prompt:
        """A prompt the size of the largest request `prepare` admits: the most images of max_pixels
        that fit the context, then text up to max_model_len - 1 tokens."""
        settings = self.settings
        count = settings.max_images_per_request
        images: list = []
        if count > 0 and hasattr(self.processor, "image_processor"):
            from PIL import Image

            side = int(settings.max_pixels ** 0.5)
            images = [Image.new("RGB", (side, side), (127, 127, 127))] * count
        while True:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "x"}]
            prompt = self._build_prompt([{"role": "user", "content": content}], images)
            if prompt.length < self.max_model_len or not images:
                break
            images = images[:-1]
        extra = max(0, self.max_model_len - 1 - prompt.length)
        input_ids = torch.cat([prompt.input_ids, prompt.input_ids[-1:].repeat(extra)])
        token_extras = {k: torch.cat([v, v.new_zeros(extra)]) for k, v in prompt.token_extras.items()}
        mrope, delta = self.layout.prompt_positions(input_ids, prompt.extras, token_extras)
        return Prompt(input_ids=input_ids, extras=prompt.extras, token_extras=token_extras,
                      mrope_positions=mrope, rope_delta=delta)

    def _count_images(self, prompt: Prompt) -> int:
        grid = prompt.extras.get("image_grid_thw")
        return 0 if grid is None else int(grid.shape[0])

    def start(self, warmup: bool = True) -> None:
        """Start the scheduler thread; then (warmup) run one short request through the whole path.
        The engine is ready (``ready``, the ready gauge) once this returns."""
        # The scheduler thread waits for the device with the GIL released and must get it back at
        # once: with Python's default 5 ms switch interval, a busy HTTP thread (streaming many
        # chunks) would hold each decode step back by up to a whole step.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlkit-engine", daemon=True)
            self._thread.start()
        if warmup:
            self.warmup()
        self.ready = True
        self.metrics.ready.set(1)

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
        """Make the next prefill or decode step raise `exc` (drives the out-of-memory path without a GPU in tests)."""
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
        self.check_image_count(len(images))
        prompt = self._build_prompt(messages, images)
        if self.runner is not None:  # the paged cache shares blocks of prompts that start the same way
            prompt.block_hashes = prompt_block_hashes(prompt.input_ids, self.model.config.image_token_id,
                                                      [image_digest(image) for image in images])
        length = prompt.length
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
        d = self._defaults
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=d["temperature"] if temperature is None else temperature,
            top_p=d["top_p"] if top_p is None else top_p,
            top_k=d["top_k"] if top_k is None else top_k,
            seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
        )
        return GenerationRequest(prompt=prompt, params=params)

    def check_image_count(self, count: int) -> None:
        """InvalidRequest when a request brings more images than the settings admit (callers check
        before decoding them; prepare checks again)."""
        if count > self.settings.max_images_per_request:
            raise InvalidRequest(
                f"At most {self.settings.max_images_per_request} image(s) may be provided in one request; got {count}.",
                param="messages", kind="too_many_images")

    def _build_prompt(self, messages: list[dict], images: list) -> Prompt:
        """Chat template + processor + positions (CPU); InvalidRequest when the processor refuses."""
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt",
                                    **(self._image_kwargs if images else {}))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(f"cannot build the prompt: {exc}", param="messages") from exc
        input_ids = inputs["input_ids"][0]
        token_keys = {k for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                      and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == inputs["input_ids"].shape}
        token_extras = {k: inputs[k][0] for k in token_keys}
        extras = {k: v for k, v in inputs.items() if k not in token_keys | {"input_ids", "attention_mask"}
                  and isinstance(v, torch.Tensor)}
        mrope, delta = self.layout.prompt_positions(input_ids, extras, token_extras)
        return Prompt(input_ids=input_ids, extras=extras, token_extras=token_extras,
                      mrope_positions=mrope, rope_delta=delta)

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
                while not self._rows and self._inflight is None and not (self._waiting and not self._paused) \
                        and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._rows and self._inflight is None:
                    return
            try:
                self._drop_cancelled()
                if not self._paused:
                    self._admit()
                # Pipelined: launch this step, then read the previous step's tokens while it runs.
                previous, self._inflight = self._inflight, None
                if self._rows:
                    self._inflight = self._launch_step(previous)
                if previous is not None:
                    self._collect_step(previous)
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
        self._raise_fault()
        return self.model(**kwargs)

    def _raise_fault(self) -> None:
        if self._fault is not None:
            fault, self._fault = self._fault, None
            raise fault

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._rows) if row.handle.cancelled]
        if gone:
            for i in gone:
                self.metrics.requests.labels("cancelled").inc()
                self._rows[i].handle._push(Event(error=Cancelled("cancelled while running")))
            self._retire(set(gone))

    def _admit(self) -> None:
        free = self.settings.max_batch_size - len(self._rows)
        cache = self.runner.cache if self.runner is not None else None
        if cache is not None:
            free = min(free, cache.free_slots)
        if free <= 0 or not self._waiting:  # a racy peek is enough: one queued now joins at the next step
            return
        blocks_left = cache.free_blocks if cache is not None else 0
        registered_soon: set[bytes] = set()
        running: list[tuple[int, int]] = []
        if self.runner is None and self._batch is not None:  # the growing-cache budget (lengths(): a device read)
            running = [(n, row.params.max_tokens - row.generated)
                       for n, row in zip(self._batch.lengths(), self._rows)]
        taken: list[tuple[GenerationRequest, RequestHandle]] = []
        with self._cv:
            while self._waiting and len(taken) < free:
                request, handle = self._waiting[0]
                group = [r for r, _ in taken] + [request]
                if cache is not None:
                    need = cache.allocation_cost(self._reserve(request), request.prompt.shareable_hashes,
                                                 registered_soon)
                    if need > blocks_left:
                        break  # waits (in order) until running requests hand their blocks back
                    blocks_left -= need
                    registered_soon |= set(request.prompt.block_hashes)  # its prefill registers them
                if self.runner is None and (running or taken) and not self.memory.fits(
                        running, [(r.prompt_tokens, r.params.max_tokens) for r in group]):
                    break  # waits for memory; an empty batch always takes the head so nothing starves
                taken.append(self._waiting.pop(0))
            self.metrics.queue_depth.set(len(self._waiting))
        if not taken:
            return
        batch = None
        try:
            prompts = [r.prompt for r, _ in taken]
            if self.runner is not None:
                self._raise_fault()
                batch, logits = SlotBatch.prefill(self.runner, self.model, prompts,
                                                  reserve=[self._reserve(r) for r, _ in taken])
                self.metrics.prefix_cache_hits.inc(sum(self.runner.cache.cached_tokens[s] for s in batch.slots))
                if batch.size < len(taken):  # a cached block they counted on went to an earlier one
                    with self._cv:
                        self._waiting[0:0] = taken[batch.size:]  # first in line again
                        self.metrics.queue_depth.set(len(self._waiting))
                    taken = taken[:batch.size]
            else:
                batch, logits = KVBatch.prefill(self._model_forward, self.layout, self.device, self._text_config,
                                                prompts, self._pad_id)
            self._trim_allocator()
            rows = [self._new_row(r, h) for r, h in taken]
            for r, _ in taken:
                self.metrics.prompt_tokens.inc(r.prompt_tokens)
            tokens = sample(logits, [row.params for row in rows], [row.generator for row in rows]).tolist()
        except BaseException as exc:  # noqa: BLE001
            if batch is not None:
                batch.release()
            self._fail([h for _, h in taken], exc)
            return
        for row, token in zip(rows, tokens):
            self._accept(row, token)
        finished = {i for i, row in enumerate(rows) if row.finish_reason is not None}
        if len(finished) == len(rows):
            batch.release()
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

    @staticmethod
    def _reserve(request: GenerationRequest) -> int:
        """KV tokens a request may fill: its prompt and every token it may generate (prepare keeps
        that within max_model_len). The last token is fed once more by the step already in flight
        when the row ends: it lands at position prompt + max_tokens - 1, inside the reservation."""
        return request.prompt_tokens + request.params.max_tokens

    def _trim_allocator(self) -> None:
        """Hand cached blocks back when prefills of changing shapes have grown the allocator's share."""
        if self._reserved_ceiling is not None and torch.cuda.memory_reserved(self.device) > self._reserved_ceiling:
            torch.cuda.empty_cache()

    def _new_row(self, request: GenerationRequest, handle: RequestHandle) -> _Row:
        return _Row(handle=handle, params=request.params,
                    detok=IncrementalDetokenizer(self.tokenizer, request.params.stop),
                    generator=make_generator(request.params, self.device), prompt_tokens=request.prompt_tokens)

    def _launch_step(self, previous: "_Step | None") -> "_Step":
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
            tokens_in = torch.cat([previous.tokens[torch.tensor(carried, device=self.device)],
                                   torch.tensor(joined, device=self.device, dtype=previous.tokens.dtype)])
        self._raise_fault()
        logits = self._batch.decode(tokens_in)
        tokens = sample(logits, [row.params for row in rows], [row.generator for row in rows])
        return _Step(rows, tokens, self.device)

    def _collect_step(self, step: "_Step") -> None:
        """Read a launched step's tokens (waiting for it if need be), stream them, retire finished rows."""
        for row, token in zip(step.rows, step.host_tokens()):
            if not row.retired:
                self._accept(row, token)
        done = {i for i, row in enumerate(self._rows) if row.finish_reason is not None}
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
        for i in indices:
            self._rows[i].retired = True
        keep = [i for i in range(len(self._rows)) if i not in indices]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch.release()
            self._batch = None
        else:
            self._batch.keep(keep)
        self.metrics.running.set(len(self._rows))

    def _fail_all(self, exc: BaseException) -> None:
        rows, self._rows, batch, self._batch = self._rows, [], self._batch, None
        self._inflight = None
        for row in rows:
            row.retired = True
        if batch is not None:
            batch.release()
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
