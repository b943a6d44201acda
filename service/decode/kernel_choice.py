"""Which kernel computes a decode-step product fastest on this device, measured per shape.

Both choices of the step's projections use it: cuBLAS or the skinny Triton GEMM for bf16 weights
(service/decode/gemv.py ``LinearChoice``), the weight-only kernel or its variants (the skinny
kernel, the product in fp16) for FP8 weights (service/decode/fp8.py ``TritonGemm``): which is
fastest differs by GPU (the ratio of its instruction rate to its memory bandwidth) and by shape.
The kernels are timed once at start-up as the step runs them, inside a CUDA graph, before the
decode graphs are captured (they keep what was chosen); a candidate replaces the baseline for a
shape only where it agrees with it and is clearly faster.

A known limit, not yet measured: the timed calls reuse one weight, so a weight smaller than the L2
cache (50 MB on an H200; 24-32 MB on Ada and Blackwell cards, 4 MB on an Ampere RTX 3070) is read from
L2 after the first call, while the step reads each layer's weight from memory once.
(bench/fp8_kernels.py times over copies beyond L2.) Whether that changes a choice is for a GPU run.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)

FASTER_BY = 0.97  # the candidate must take at most this share of the baseline's time (noise is ~1%)
REPEATS = 10  # graph replays timed per kernel (the median counts)


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """One warm-up stream per device for every timing: torch keeps a cuBLAS workspace for each
    stream that ever ran a cuBLAS call (32 MiB on Hopper), so a new stream per timing held 0.5-0.7
    GiB outside the memory plan after start-up (measured on an H200, 2B bf16, 8 GiB plan)."""
    return torch.cuda.Stream(device_index)


def release_workspaces() -> None:
    """Give back the cuBLAS workspaces torch caches per stream (re-made on a stream's next cuBLAS
    call): after the start-up's timing, before the memory the plan shared out is checked."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available():
        clear()


def graph_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Device microseconds per call of ``fn`` as a decode step runs it: ``calls`` of it captured in one
    CUDA graph, replayed ``repeats`` times, the median. (Timing single eager calls would count the
    host's launch, which the step's graph does not pay.)"""
    calls = 20
    fn()  # compiles / autotunes outside the capture
    side = _side_stream(torch.cuda.current_device())
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
    """Per shape (any hashable key), the name of the candidate kernel that replaces the baseline;
    a shape not in it keeps the baseline."""

    def __init__(self, what: str) -> None:
        self.what = what  # for the log: "<what> (key: baseline us / each candidate's us)"
        self.chosen: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}  # key -> {"baseline" or a candidate: us}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.chosen

    def get(self, key: Hashable) -> str | None:
        return self.chosen.get(key)

    def measure(self, key: Hashable, baseline: Callable[[], torch.Tensor],
                candidates: dict[str, Callable[[], torch.Tensor]], tolerance: float) -> None:
        """Time the products (no-argument calls on the same inputs), once per key; keep the fastest
        candidate among those whose relative error against the baseline is under ``tolerance``
        where it is faster than the baseline by the margin. A candidate that cannot run here is
        left out (the baseline must run)."""
        if key in self.timings:
            return
        try:
            reference = baseline()
            timing = {"baseline": graph_time(baseline)}
        except Exception as exc:  # noqa: BLE001 - nothing to compare against: no choice for this key
            log.warning("%s: the baseline failed for %s: %s", self.what, key, exc)
            return
        for name, candidate in candidates.items():
            try:
                ours = candidate()  # first: it autotunes, or fails, here
                error = ((ours.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-6)).item()
                if error < tolerance:
                    timing[name] = graph_time(candidate)
                else:
                    log.warning("%s: %s disagrees with the baseline for %s (relative error %.3g)", self.what, name,
                                key, error)
            except Exception as exc:  # noqa: BLE001 - a kernel this Triton or driver cannot run: not chosen
                log.warning("%s: %s is unavailable for %s: %s", self.what, name, key, exc)
        self.timings[key] = timing
        best = min((t, name) for name, t in timing.items() if name != "baseline") if len(timing) > 1 else None
        if best is not None and best[0] < FASTER_BY * timing["baseline"]:
            self.chosen[key] = best[1]

    def report(self) -> None:
        def times(timing: dict[str, float]) -> str:
            return " / ".join(f"{name} {us:.1f}" for name, us in timing.items())

        log.info("%s (key: us): %s; a candidate for %d of %d", self.what,
                 "; ".join(f"{k}: {times(t)}{' -> ' + self.chosen[k] if k in self.chosen else ''}"
                           for k, t in sorted(self.timings.items())),
                 len(self.chosen), len(self.timings))
