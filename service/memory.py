"""Admission by memory: does one more request fit the GPU budget?

The budget (``memory_budget_gib``) is for the whole process as NVML sees it. Torch sees its own
allocations only, so the CUDA context (not visible to torch) is taken off the top. A request
reserves the KV cache of its whole life (prompt + max_tokens, padded to the batch's longest), and
its prefill needs activations for a moment; both are estimates from the model's shapes. A request
that does not fit waits in the queue. On the CPU there is no budget (system RAM is not the limit
this protects).
"""
from __future__ import annotations

import torch

GIB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS workspaces, outside torch's allocator (typical)
ACTIVATION_FACTOR = 6  # bytes of live activations per (token x hidden x element) during prefill, generous


class MemoryBudget:
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
