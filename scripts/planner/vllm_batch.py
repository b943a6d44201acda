"""--max-num-seqs and --max-num-batched-tokens: from the KV cache and what each step of them costs.

vLLM admits requests by KV blocks, so more sequences than the KV cache holds only wait; within
that, more sequences decode more tokens a step (measured on an emulated 16 GiB card, 2B, 32
concurrent image requests: 1263 tok/s at 8 sequences, 1888 at 32, same KV cache). What they cost is
in the prediction (vllm_memory.py): the sampler's rows x vocab in the profiling run, more CUDA
graphs (capture sizes up to 2 x max_num_seqs); a larger max_num_batched_tokens profiles more dummy
images, a longer decoder pass and larger DeepStack buffers. So: as many sequences as the KV cache
holds typical image requests (one image at max_pixels + a prompt + an answer), then larger batches,
each step only while the plan's context still fits with its margin and all of it together costs at
most THROUGHPUT_SHARE of the KV cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .models import ModelSpec
from .targets import MIN_BATCH, min_useful_context
from .vllm_memory import VllmBudget, VllmKnobs, predict

MIN_MAX_NUM_SEQS = MIN_BATCH
SEQ_STEPS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
BATCHED_TOKEN_STEPS = (2048, 4096, 8192)
THROUGHPUT_SHARE = 0.05                # at most this share of the KV cache goes to throughput


@dataclass(frozen=True)
class BatchChoice:
    budget: VllmBudget                 # the prediction at the chosen knobs
    base: VllmBudget                   # at MIN_MAX_NUM_SEQS sequences, the smallest batch
    typical_tokens: int                # one image request
    requests_held: int                 # typical requests the chosen KV cache holds at once

    @property
    def cost(self) -> int:
        """Bytes the chosen sequences and batch take beyond the base (out of the KV cache)."""
        return self.base.kv_available - self.budget.kv_available


def choose_batch(spec: ModelSpec, base: VllmKnobs, *, total: int, free: int,
                 still_fits: Callable[[VllmBudget], bool]) -> BatchChoice:
    """The largest sequences, then batched tokens, that the rule allows. ``base`` carries the
    rung's other knobs (the smallest batch); ``still_fits``: the plan's context fits this budget."""
    base = replace(base, max_num_seqs=MIN_MAX_NUM_SEQS, max_num_batched_tokens=BATCHED_TOKEN_STEPS[0])
    floor = predict(spec, base, total=total, free=free)
    typical = min_useful_context(spec, base.max_pixels)
    allowed = THROUGHPUT_SHARE * max(0, floor.kv_available)

    def ok(b: VllmBudget, seqs: int) -> bool:
        return (not b.errors and still_fits(b) and seqs * typical <= b.kv_tokens
                and floor.kv_available - b.kv_available <= allowed)

    chosen = floor
    for seqs in SEQ_STEPS[1:]:
        b = predict(spec, replace(base, max_num_seqs=seqs), total=total, free=free)
        if not ok(b, seqs):
            break
        chosen = b
    seqs = chosen.knobs.max_num_seqs
    for tokens in BATCHED_TOKEN_STEPS[1:]:
        b = predict(spec, replace(chosen.knobs, max_num_batched_tokens=tokens), total=total, free=free)
        if not ok(b, seqs):
            break
        chosen = b
    return BatchChoice(chosen, floor, typical, chosen.kv_tokens // typical)
