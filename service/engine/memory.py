"""GPU memory as NVML sees it: what this process holds, the figure the memory budget is about. (The
host's memory, the CPU's only limit, is service/host_memory.py's.)

The budget (``memory_budget_gib``) is for the whole process as NVML sees it: weights, the CUDA
context and library workspaces (outside torch's allocator), the KV cache, CUDA graph pools and the
activations of a prefill. torch counts only its own allocations, so the start-up plan reads NVML.
"""
from __future__ import annotations

import os

import torch

from service.sizing import CUDA_CONTEXT_BYTES


class ProcessMemory:
    """Bytes this process holds on one GPU, as NVML counts them.

    NVML's per-process figure where the driver gives one (Linux); otherwise (WSL2, or a container
    that hides PIDs) the device's used memory above what it used when this object was made, which
    must therefore be made before the process touches the GPU. Without NVML: torch's reserved
    bytes plus the typical CUDA context.
    """

    def __init__(self, device_index: int = 0):
        self._nvml = None
        self._handle = None
        self.baseline = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(device_index))
            self._nvml = pynvml
            self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # noqa: BLE001 - no NVML (CPU machine, old driver): torch's figures + an estimate
            self._nvml = None

    def used(self) -> int:
        if self._nvml is not None:
            try:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory:
                        return int(proc.usedGpuMemory)
                return max(0, self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used - self.baseline)
            except self._nvml.NVMLError:
                pass
        return (torch.cuda.memory_reserved() + CUDA_CONTEXT_BYTES) if torch.cuda.is_initialized() else 0


def _nvml_index(device_index: int) -> int:
    """NVML numbers GPUs by PCI order; CUDA_VISIBLE_DEVICES may renumber them for torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if visible != [""] and device_index < len(visible) and visible[device_index].strip().isdigit():
        return int(visible[device_index])
    return device_index
