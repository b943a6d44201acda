"""Run decode steps for chosen slots: CUDA graphs on CUDA (captured at start-up), eager elsewhere.

The step's inputs live in static device buffers; a step covers the first B slots (B from a few
batch-size buckets) and reads keys up to a context bucket Lb (so a short context does not read the
whole slot). One graph per (B, Lb), all sharing one memory pool. The same `_run` executes eagerly
(CPU, or when capture fails), so both paths compute the same thing from the same buffers.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Sequence

import torch

from service.decode.qwen3_step import Qwen3VLDecoder

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_CONTEXT_STEP = 256


def context_buckets(max_len: int, step: int = DEFAULT_CONTEXT_STEP) -> list[int]:
    """Key lengths to specialise for: multiples of ``step``, each at most ~25% above the last, then ``max_len``."""
    buckets, size = [], min(step, max_len)
    while size < max_len:
        buckets.append(size)
        size += max(step, size // 4 // step * step)
    return buckets + [max_len]


def _smallest_at_least(buckets: Iterable[int], need: int) -> int:
    return min(b for b in buckets if b >= need)


class DecodeRunner:
    """Decode one token for each of some slots of the decoder's cache, as fast as the device allows.

    ``decode(slots, token_ids)`` feeds ``token_ids[i]`` to ``slots[i]`` (at its next position),
    advances those slots by one token and returns their next-token logits. Call ``capture()`` once
    at start-up on CUDA; without it (or on CPU, or after a failed capture) steps run eagerly.
    Not thread-safe: one scheduler thread drives it.
    """

    def __init__(self, decoder: Qwen3VLDecoder, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 context_step: int = DEFAULT_CONTEXT_STEP) -> None:
        self.decoder = decoder
        self.cache = cache = decoder.cache
        slots = cache.num_slots
        self.batch_sizes = sorted({min(b, slots) for b in batch_sizes if b > 0} | {slots})
        self.context_sizes = context_buckets(cache.max_len, context_step)
        # Static inputs, one column per slot: token id, rotary position, active flag; and the order of
        # the caller's slots (to gather their logits). Filled from a pinned host copy without a sync.
        on_cuda = cache.device.type == "cuda"
        self._inputs = torch.zeros(4, slots, dtype=torch.long, device=cache.device)
        self._staging = torch.zeros(4, slots, dtype=torch.long, pin_memory=on_cuda)
        self._staged = torch.cuda.Event() if on_cuda else None  # the last copy out of _staging
        self.logits = torch.zeros(slots, decoder.vocab_size, dtype=torch.float32, device=cache.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_error: str | None = None
        self.capture_seconds = 0.0

    @staticmethod
    def slot_bytes(vocab_size: int) -> int:
        """Device bytes one slot takes: its row of logits (float32) and its column of inputs (4 int64)."""
        return vocab_size * 4 + 4 * 8

    @property
    def uses_cuda_graphs(self) -> bool:
        return bool(self.graphs)

    def _run(self, rows: int, context_len: int) -> None:
        ids, positions, active = self._inputs[0, :rows], self._inputs[1, :rows], self._inputs[2, :rows] != 0
        self.logits[:rows].copy_(self.decoder.step(ids, positions, active, context_len))

    @torch.no_grad()
    def capture(self) -> None:
        """Capture one CUDA graph per (batch, context) bucket; on failure log why and stay eager."""
        if self.cache.device.type != "cuda":
            return
        start = time.perf_counter()
        self._inputs.zero_()  # every row inactive: warm-up and capture leave the cache untouched
        try:
            with torch.cuda.device(self.cache.device):
                self._capture_all()
        except Exception as exc:  # e.g. a module that syncs (dynamic rope) or a kernel that cannot be captured
            self.graphs.clear()
            self.capture_error = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.capture_error)
        self.capture_seconds = time.perf_counter() - start
        if self.graphs:
            log.info("captured %d decode graphs (batch %s x context %s) in %.1f s", len(self.graphs),
                     self.batch_sizes, self.context_sizes, self.capture_seconds)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run each batch size once with every row inactive (compiles what is compiled), without graphs."""
        self._inputs.zero_()
        for rows in self.batch_sizes:
            self._run(rows, self.context_sizes[0])

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        # Largest first, so later (smaller) graphs reuse the pool memory of earlier ones.
        for rows in reversed(self.batch_sizes):
            for context_len in reversed(self.context_sizes):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: lazy initialisation happens outside the capture
                    self._run(rows, context_len)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._run(rows, context_len)
                self.graphs[(rows, context_len)] = graph
        torch.cuda.synchronize()

    @torch.no_grad()
    def decode(self, slots: Sequence[int], token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits ``[len(slots), vocab]`` (float32, on the cache's device) after feeding ``token_ids``.

        ``token_ids`` may be a device tensor (e.g. the previous step's sampled tokens): then nothing
        waits for the device, and the host can read the previous tokens while this step runs.
        The result is a view into a buffer the next call overwrites: sample from it first.
        """
        cache = self.cache
        on_device = isinstance(token_ids, torch.Tensor)
        if len(slots) != len(token_ids) or not slots:
            raise ValueError("decode needs one token id per slot, and at least one slot")
        width = cache.num_slots
        ids, positions, active, order = [0] * width, [0] * width, [0] * width, [0] * width
        for i, slot in enumerate(slots):
            if not 0 <= slot < width or cache.lengths[slot] == 0 or active[slot]:
                raise ValueError(f"slot {slot} holds no sequence, or appears twice")
            if cache.lengths[slot] >= cache.capacity[slot]:
                raise ValueError(f"slot {slot} is full ({cache.capacity[slot]} tokens reserved)")
            positions[slot], active[slot], order[i] = cache.lengths[slot] + cache.rope_deltas[slot], 1, slot
            if not on_device:
                ids[slot] = token_ids[i]
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's inputs have left the staging buffer
        self._staging.copy_(torch.tensor([ids, positions, active, order], dtype=torch.long))
        self._inputs.copy_(self._staging, non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        if on_device:
            self._inputs[0].index_copy_(0, self._inputs[3, :len(slots)], token_ids.to(self._inputs.dtype))
        rows = _smallest_at_least(self.batch_sizes, max(slots) + 1)
        context_len = _smallest_at_least(self.context_sizes, max(cache.lengths[s] for s in slots) + 1)
        graph = self.graphs.get((rows, context_len))
        if graph is not None:
            graph.replay()
        else:
            self._run(rows, context_len)
        for slot in slots:
            cache.lengths[slot] += 1
        if list(slots) == list(range(len(slots))):
            return self.logits[:len(slots)]
        return self.logits.index_select(0, self._inputs[3, :len(slots)])
