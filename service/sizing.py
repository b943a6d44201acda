"""How the 8gb service sizes itself: the rules the engine applies and the host planner predicts.

One definition of each fact, and no torch here: the engine (service/engine/) measures what it can
(weights and CUDA context through NVML, the largest request's prefill) and shares its budget out
with these rules; the planner (scripts/planner/service_memory.py) estimates the measured parts from
the model's shapes and applies the same rules, so a plan the planner calls fitting is one the
service starts with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

GIB = 1024**3
MIB = 1024**2

BLOCK_SIZE = 64  # tokens per KV block; also the split-KV attention kernel's block of work
# Prompt tokens one prefill pass computes at most where nothing sets it (VLKIT_MAX_NUM_BATCHED_TOKENS):
# bounds the decoder's activations and, through vision_batch_tokens, the vision tower's. The planner
# raises it per card where the KV cache can spare the memory (scripts/planner/service_plan.py): on an
# H200 (2B, 32 image requests at once, engine only) passes of 4096 tokens made 1.8x the throughput of
# 1024-token ones, each pass's kernels launched once for more prompts.
DEFAULT_BATCHED_TOKENS = 1024
# Prompt positions whose logits one lm_head call computes for a request with prompt logprobs (vLLM's
# prompt_logprobs): with Qwen3-VL's 151936-token vocabulary, their bf16 logits, float32 log-softmax
# and rank mask are 9.3 + 18.6 + 4.6 MiB. Each call reads the whole lm_head weight, so fewer rows
# would cost more passes over it. The memory plan's measured prefill computes them too
# (service/engine/startup.py, run_largest_pass), so the prefill reserve holds them.
PROMPT_LOGPROBS_ROWS = 32
# Batch sizes the decode step is captured for (up to max_batch_size); a batch in between runs in
# the next larger graph. The planner's batch cap stops at the largest.
DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
# Kept free beyond the measured figures: the decode graphs' pool (a few MiB of activations and
# logits for up to max_batch rows), kernels loaded later, the allocator's rounding.
HEADROOM_BYTES = 256 * MIB
# CUDA context, cuBLAS and attention workspaces, outside torch's allocator. Measured (NVML) on an
# H100 with Qwen3-VL-2B bf16: 4.74-4.76 GiB resident with 3.96 GiB of weights. The engine measures
# the real figure where NVML answers; this is what it assumes where it does not, and what the
# planner predicts.
CUDA_CONTEXT_BYTES = 800 * MIB


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """The KV blocks ``tokens`` tokens take."""
    return -(-tokens // block_size)


def kv_bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, tp: int = 1) -> int:
    """K and V of one token over every layer (per GPU when ``tp`` GPUs split the KV heads)."""
    return 2 * layers * max(1, kv_heads // tp) * head_dim * dtype_bytes


def vision_batch_tokens(batched_tokens: int, image_tokens: int, images: int) -> int:
    """Image tokens one forward of the vision tower holds at most: as many whole images of the
    largest admissible request (``images`` of ``image_tokens`` each) as a pass of ``batched_tokens``
    holds, at least one. The memory plan measures that request's prefill, whose images go through the
    tower in batches of this size, so no batch of any pass goes beyond what was measured."""
    return max(1, min(images, batched_tokens // max(1, image_tokens))) * image_tokens


def images_in_largest_request(max_images: int, max_model_len: int, prompt_length: Callable[[int], int]) -> int:
    """How many images the largest request the service admits holds: as many of ``max_pixels`` as
    leave the prompt shorter than the context, at most ``max_images`` (the rest of the context is
    text). ``prompt_length(n)``: the tokens of a prompt with n such images and a word of text (the
    engine counts them with the real processor, the planner from the chat template's shape)."""
    count = max(0, max_images)
    while count and prompt_length(count) >= max_model_len:
        count -= 1
    return count


@dataclass
class KVPlan:
    """How the budget is shared out (bytes): for the start-up log, the planner and the benchmark."""

    budget: int
    resident: int  # weights, CUDA context, workspaces
    prefill_peak: int  # activations of the largest admissible request's prefill
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

    @property
    def used(self) -> int:
        return self.resident + self.prefill_peak + self.headroom + self.kv_bytes

    def describe(self) -> str:
        return (f"memory budget {self.budget / GIB:.2f} GiB = resident {self.resident / GIB:.2f} (weights, CUDA "
                f"context) + prefill reserve {self.prefill_peak / GIB:.2f} + headroom {self.headroom / GIB:.2f} + "
                f"KV cache {self.kv_bytes / GIB:.2f} ({self.tokens} tokens in {self.blocks} blocks of {self.block_size}; "
                f"{self.full_sequences} sequence(s) of {self.max_len}); unused {(self.budget - self.used) / GIB:.2f}")


def plan_kv_blocks(*, budget_bytes: int, resident_bytes: int, prefill_peak_bytes: int, block_bytes: int,
                   max_len: int, max_sequences: int, block_size: int = BLOCK_SIZE,
                   headroom_bytes: int = HEADROOM_BYTES) -> KVPlan:
    """As many KV blocks as fit beside what is resident and the prefill reserve (one of them scratch),
    at most enough for ``max_sequences`` sequences of ``max_len`` tokens."""
    free = budget_bytes - resident_bytes - prefill_peak_bytes - headroom_bytes
    blocks = max(0, min(max_sequences * blocks_for(max_len, block_size), free // block_bytes - 1))
    return KVPlan(budget_bytes, resident_bytes, prefill_peak_bytes, headroom_bytes, block_bytes, block_size, blocks,
                  max_len)
