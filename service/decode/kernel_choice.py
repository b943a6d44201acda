"""Which of two kernels computes a decode-step product faster on this device, measured per shape.

Both choices of the step's projections use it: cuBLAS or the skinny Triton GEMM for bf16 weights
(service/decode/gemv.py ``LinearChoice``), the weight-only or the skinny kernel for FP8 weights
(service/decode/fp8.py ``TritonGemm``). Each pair is timed once at start-up as the step runs them,
inside a CUDA graph, before the decode graphs are captured (they keep what was chosen); the
candidate replaces the baseline for a shape only where it agrees with it and is clearly faster.
"""
from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)

FASTER_BY = 0.97  # the candidate must take at most this share of the baseline's time (noise is ~1%)
REPEATS = 10  # graph replays timed per kernel (the median counts)


def graph_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Device microseconds per call of ``fn`` as a decode step runs it: ``calls`` of it captured in one
    CUDA graph, replayed ``repeats`` times, the median. (Timing single eager calls would count the
    host's launch, which the step's graph does not pay.)"""
    calls = 20
    fn()  # compiles / autotunes outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return sorted(times)[len(times) // 2]


class KernelChoice:
    """The shapes (any hashable key) for which the candidate kernel replaces the baseline."""

    def __init__(self, what: str) -> None:
        self.what = what  # for the log: "<what> (key: baseline us / candidate us)"
        self.chosen: set[Hashable] = set()
        self.timings: dict[Hashable, tuple[float, float]] = {}  # key -> (baseline us, candidate us)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.chosen

    def measure(self, key: Hashable, baseline: Callable[[], torch.Tensor], candidate: Callable[[], torch.Tensor],
                tolerance: float) -> None:
        """Time both products (no-argument calls on the same inputs), once per key; keep the candidate
        where its relative error against the baseline is under ``tolerance`` and it is faster by the
        margin. A candidate that cannot run here leaves the baseline."""
        if key in self.timings:
            return
        try:
            ours = candidate()  # first: it autotunes, or fails, here
            reference = baseline()
            error = ((ours.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-6)).item()
            timing = (graph_time(baseline), graph_time(candidate))
        except Exception as exc:  # noqa: BLE001 - a kernel this Triton or driver cannot run: the baseline
            log.warning("%s: the candidate is unavailable for %s: %s", self.what, key, exc)
            return
        self.timings[key] = timing
        if error < tolerance and timing[1] < FASTER_BY * timing[0]:
            self.chosen.add(key)

    def report(self) -> None:
        log.info("%s (key: baseline us / candidate us): %s; the candidate for %d of %d", self.what,
                 ", ".join(f"{k}: {a:.1f}/{b:.1f}" for k, (a, b) in sorted(self.timings.items())),
                 len(self.chosen), len(self.timings))
