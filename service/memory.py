"""GPU memory: what the process uses as NVML sees it, and how the budget is shared out.

The budget (``memory_budget_gib``) is for the whole process as NVML sees it: weights, the CUDA
context and library workspaces (outside torch's allocator), the KV cache, CUDA graph pools and the
activations of a prefill.

Qwen3-VL (paged cache): everything is sized at start-up from measurements. After the weights
load, a prefill of the largest admissible request (``max_images_per_request`` images of
``max_pixels`` plus text up to ``max_model_len``) is run once and its activation peak measured (the
prefill writes K/V straight into the cache's blocks, so that peak holds no copy of them); the KV
cache then gets what remains (:func:`plan_kv_blocks`), as blocks of 64 tokens. At run time a
prefill group never exceeds that measured request (the engine splits larger groups), and a request
whose prompt and max_tokens do not fit the free blocks waits in the queue.

Other models (growing DynamicCache): :class:`MemoryBudget` estimates each admission from the model's
shapes. On the CPU there is no budget (system RAM is not the limit this protects).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from service.decode.cache import blocks_for

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
CUDA_CONTEXT_BYTES = 600 * MIB  # CUDA context + cuBLAS workspaces, outside torch's allocator (typical)
ACTIVATION_FACTOR = 6  # bytes of live activations per (token x hidden x element) during prefill, generous
# Kept free beyond the measured figures: the decode graphs' pool (a few MiB of activations and
# logits for up to max_batch rows), kernels loaded later, the allocator's rounding.
HEADROOM_BYTES = 256 * MIB


class ProcessMemory:
    """Bytes this process holds on one GPU, as NVML counts them.

    NVML's per-process figure where the driver gives one (Linux); otherwise (WSL2, or a container
    that hides PIDs) the device's used memory above what it used when this object was made, which
    must therefore be made before the process touches the GPU.
    """

    def __init__(self, device_index: int = 0):
        self._nvml = None
        self._handle = None
        self.baseline = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            index = _nvml_index(device_index)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
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


@dataclass
class KVPlan:
    """How the budget is shared out (bytes), for the start-up log and the benchmark."""

    budget: int
    resident: int  # weights, CUDA context, workspaces: measured after loading and the warm-up prefill
    prefill_peak: int  # activations of the largest admissible request, measured
    headroom: int
    block_bytes: int  # one block of block_size tokens, every layer's K and V
    block_size: int
    blocks: int  # usable blocks (the pool holds one more: the scratch block)
    max_len: int

    @property
    def kv_bytes(self) -> int:
        return (self.blocks + 1) * self.block_bytes

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def full_sequences(self) -> int:
        """Sequences of max_len tokens the cache holds at once (shorter ones: more)."""
        return self.blocks // blocks_for(self.max_len, self.block_size)

    def describe(self) -> str:
        return (f"memory budget {self.budget / GIB:.2f} GiB = resident {self.resident / GIB:.2f} (weights, CUDA "
                f"context) + prefill reserve {self.prefill_peak / GIB:.2f} + headroom {self.headroom / GIB:.2f} + "
                f"KV cache {self.kv_bytes / GIB:.2f} ({self.tokens} tokens in {self.blocks} blocks of {self.block_size}; "
                f"{self.full_sequences} sequence(s) of {self.max_len}); "
                f"unused {(self.budget - self.resident - self.prefill_peak - self.headroom - self.kv_bytes) / GIB:.2f}")


def plan_kv_blocks(*, budget_bytes: int, resident_bytes: int, prefill_peak_bytes: int, block_bytes: int,
                   block_size: int, max_len: int, max_sequences: int, headroom_bytes: int = HEADROOM_BYTES) -> KVPlan:
    """As many KV blocks as fit beside what is resident and the prefill reserve (one of them scratch),
    at most enough for ``max_sequences`` sequences of ``max_len`` tokens."""
    free = budget_bytes - resident_bytes - prefill_peak_bytes - headroom_bytes
    per_sequence = blocks_for(max_len, block_size)
    blocks = max(0, min(max_sequences * per_sequence, free // block_bytes - 1))
    return KVPlan(budget_bytes, resident_bytes, prefill_peak_bytes, headroom_bytes, block_bytes, block_size, blocks,
                  max_len)


class MemoryBudget:
    """Admission estimate for the growing-cache path: does one more request fit the GPU budget?

    Torch sees its own allocations only, so the CUDA context (not visible to torch) is taken off the
    top. A request reserves the KV cache of its whole life (prompt + max_tokens, padded to the
    batch's longest), and its prefill needs activations for a moment; both are estimates from the
    model's shapes. A request that does not fit waits in the queue.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, budget_gib: float):
        text = model.config.get_text_config()
        elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_bytes_per_token = 2 * text.num_hidden_layers * heads * head_dim * elem
        self._act_bytes_per_token = ACTIVATION_FACTOR * max(text.hidden_size, getattr(text, "intermediate_size", 0)) * elem
        self._logit_bytes = text.vocab_size * 4
        self.enabled = device.type == "cuda"
        self.limit_bytes = int(budget_gib * GIB) - CUDA_CONTEXT_BYTES
        self.base_bytes = torch.cuda.memory_allocated(device) if self.enabled else 0  # weights and buffers

    def fits(self, running: list[tuple[int, int]], new: list[tuple[int, int]]) -> bool:
        """running/new: (current_or_prompt_tokens, tokens_still_to_generate) per row."""
        if not self.enabled:
            return True
        rows = running + new
        width = max(now + left for now, left in rows)
        kv = len(rows) * width * self.kv_bytes_per_token
        prefill = sum(now for now, _ in new) * self._act_bytes_per_token + len(rows) * self._logit_bytes
        return self.base_bytes + kv + prefill <= self.limit_bytes
