"""Measuring tools: device copy bandwidth, weight bytes per decode step, clocks, memory."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import torch

GIB = 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def clock(device: torch.device) -> Iterator[list[float]]:
    """``with clock(dev) as t: ...`` then ``t[0]`` is the wall time in seconds, device work included."""
    result = [0.0]
    sync(device)
    start = time.perf_counter()
    yield result
    sync(device)
    result[0] = time.perf_counter() - start


def copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), the best of ``repeats``."""
    n = int(gib * GIB) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        with clock(device) as t:
            dst.copy_(src)
        best = min(best, t[0])
    del src, dst
    return 2 * n * 4 / best / 1e9


def text_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the text decoder's, plus lm_head (once when tied).

    The embedding table is only gathered (one row per token), so it counts only as lm_head.
    """
    text = model.model.language_model
    embed = text.embed_tokens.weight
    head = model.get_output_embeddings().weight
    decoder = sum(p.numel() * p.element_size() for p in text.parameters() if p is not embed)
    return decoder + head.numel() * head.element_size()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Memory:
    """Peak memory as torch sees it, and the process as NVML (the driver) sees it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.nvml_peak = 0
        self.nvml_note = "n/a"
        self._handle = None
        if device.type == "cuda":
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._nvml = pynvml
            except Exception as exc:  # no NVML: report torch's figures only
                self.nvml_note = f"NVML unavailable ({type(exc).__name__})"

    def sample(self) -> None:
        """Read NVML now (call at the end of each phase: the caching allocator keeps its peak)."""
        if self._handle is None:
            return
        used, note = None, "process"
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid():
                    used = proc.usedGpuMemory
        except self._nvml.NVMLError:
            pass
        if used is None:  # e.g. another PID namespace: the whole device is the upper bound
            used, note = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used, "whole device"
        self.nvml_peak = max(self.nvml_peak, used or 0)
        self.nvml_note = note

    @property
    def torch_peak_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    @property
    def torch_peak_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else 0
