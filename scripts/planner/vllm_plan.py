"""The 16gb profile's ladder: `vllm serve` flags that fit the card, or the best attempt (no advice).

--gpu-memory-utilization from the free memory, then the largest context the predicted KV cache
holds after a margin. When it does not reach the wanted context the ladder steps down, in this
order: fp8 KV cache, eager mode (no CUDA graphs), smaller images. evaluate_vllm() instead predicts
a hand-written `vllm serve --gpu-memory-utilization F` with vLLM's defaults for the rest.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from scripts.usage import setting
from service.sizing import GIB, MIB

from .card import START_SLACK_BYTES, Card
from .models import ModelSpec
from .schema import BudgetRow, Plan
from .targets import IMAGE_LIMIT, PIXEL_STEPS, min_useful_context, round_context
from .vllm_batch import BATCHED_TOKEN_STEPS, MIN_MAX_NUM_SEQS, THROUGHPUT_SHARE, BatchChoice, choose_batch
from .vllm_memory import (
    DEFAULT_IMAGE_LIMIT, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, LARGE_GPU_BYTES,
    LARGE_MAX_NUM_BATCHED_TOKENS, LARGE_MAX_NUM_SEQS, NCCL_BYTES, VLLM_BLOCK_SIZE, VLLM_CUDA_CONTEXT_BYTES,
    VllmBudget, VllmKnobs, predict,
)

UTIL_CAP = 0.95
DEFAULT_CONTEXT = 8192             # the context the ladder aims for when none is asked for
CONTEXT_CAP = 32768                # more only when asked for (--context)
# Tool calling as on the 8gb service: Qwen3-VL writes Hermes `<tool_call>` blocks, which vLLM's
# `hermes` parser reads; auto tool choice is OpenAI's default. Memory-neutral.
TOOL_CALLING_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


@dataclass(frozen=True)
class VllmOutcome:
    plan: Plan              # fits, or the best attempt (no flags); no refusal: advice.py writes it
    budget: VllmBudget      # the prediction behind it
    batch: BatchChoice | None = None   # how --max-num-seqs / --max-num-batched-tokens were chosen


def margin(b: VllmBudget) -> int:
    """What the estimate may be off by: 256 MiB plus 15% of what is estimated rather than known."""
    return 256 * MIB + int(0.15 * (b.activations + b.cuda_graphs + b.non_torch))


def _capacity(b: VllmBudget) -> int:
    """Context one sequence may have while the margin stays in the KV cache."""
    usable = b.kv_available - margin(b)
    return max(0, usable // (VLLM_BLOCK_SIZE * b.kv_bytes_per_token)) * VLLM_BLOCK_SIZE


def _util_for(card: Card) -> float:
    outside = VLLM_CUDA_CONTEXT_BYTES + (NCCL_BYTES if card.count > 1 else 0)   # VllmBudget.outside_requested
    room = card.free - outside - START_SLACK_BYTES
    return max(0.0, min(UTIL_CAP, math.floor(room / card.total * 100) / 100))


def _rungs() -> list[tuple[str, str, bool, int]]:
    """(name, KV cache dtype, eager, max_pixels), best first."""
    first = PIXEL_STEPS[0]
    rungs = [("bf16 KV cache, CUDA graphs", "auto", False, first),
             ("fp8 KV cache, CUDA graphs", "fp8", False, first),
             ("fp8 KV cache, eager", "fp8", True, first)]
    rungs += [(f"fp8 KV cache, eager, max_pixels {p}", "fp8", True, p) for p in PIXEL_STEPS[1:]]
    return rungs


@dataclass
class _Choice:
    budget: VllmBudget
    context: int
    rung: str


def _climb(spec: ModelSpec, card: Card, wanted: int | None) -> tuple[_Choice | None, _Choice]:
    """(the choice that fits, else None; what is shown: that choice or the best attempt)."""
    util = _util_for(card)
    target = wanted or DEFAULT_CONTEXT
    best: _Choice | None = None       # the best attempt: the longest useful context any rung holds
    best_rank: tuple[bool, int] = (False, -1)
    fallback: _Choice | None = None
    for step, (name, kv, eager, px) in enumerate(_rungs()):
        def predict_at(ctx: int) -> VllmBudget:
            return predict(spec, VllmKnobs(
                gpu_memory_utilization=util, max_model_len=max(ctx, 16), max_num_seqs=MIN_MAX_NUM_SEQS,
                max_num_batched_tokens=BATCHED_TOKEN_STEPS[0], max_pixels=px,
                image_limit=IMAGE_LIMIT, kv_cache_dtype=kv, enforce_eager=eager,
                tensor_parallel_size=card.count), total=card.total, free=card.free)
        b = predict_at(target)
        cap = min(_capacity(b), spec.text.max_position)
        if wanted:
            ctx = wanted
        else:  # the context changes how many dummy images fit a prompt: predict again at it
            b = predict_at(round_context(min(cap, CONTEXT_CAP)))
            cap = min(_capacity(b), spec.text.max_position)
            ctx = round_context(min(cap, CONTEXT_CAP))
        ok = util > 0 and not b.errors and cap >= ctx >= min_useful_context(spec, px)
        if ok and ctx >= target and step and not wanted:
            # Stepped down to reach the target: take the target, not more (so a larger card, which
            # keeps more of the quality, never gets a shorter context).
            ctx, b = target, predict_at(target)
        choice = _Choice(b, ctx, name)
        if ok and ctx >= target:
            return choice, choice
        if ok and not wanted and (fallback is None or ctx > fallback.context):
            fallback = choice
        # What this rung holds, up to the target; useful only if one image request fits in it (at this
        # rung's images), so that the refusal's "a shorter context" is one the ladder accepts.
        reach = min(cap, target)
        rank = (util > 0 and reach >= min_useful_context(spec, px), reach)
        if rank > best_rank:
            best, best_rank = _Choice(b, reach, name), rank
    return fallback, (fallback or best)


def plan_vllm(spec: ModelSpec, card: Card, wanted: int | None) -> VllmOutcome:
    choice, shown = _climb(spec, card, wanted)
    b, batch = shown.budget, None
    if choice is not None:
        batch = choose_batch(spec, b.knobs, total=card.total, free=card.free,
                             still_fits=lambda nb: _capacity(nb) >= shown.context)
        b = batch.budget
    plan = _plan(spec, card, b, shown.context, fits=choice is not None, batch=batch)
    if choice is not None:
        plan.vllm_args = vllm_args(replace(b.knobs, max_model_len=shown.context))
    plan.notes.append(f"chosen: {shown.rung}" if choice else f"best attempt: {shown.rung}")
    return VllmOutcome(plan, b, batch)


def evaluate_vllm(spec: ModelSpec, card: Card, util: float, wanted: int | None) -> VllmOutcome:
    """`vllm serve MODEL --gpu-memory-utilization util [--max-model-len wanted]`, everything else at
    vLLM's defaults: what a hand-written command gets."""
    if not 0 < util <= 1:
        raise ValueError(f"{setting('gpu_memory_utilization')} must be in (0, 1], got {util}")
    large = card.total >= LARGE_GPU_BYTES
    ctx = wanted or spec.text.max_position
    seqs = LARGE_MAX_NUM_SEQS if large else DEFAULT_MAX_NUM_SEQS
    mnbt = min(seqs * ctx, LARGE_MAX_NUM_BATCHED_TOKENS if large else DEFAULT_MAX_NUM_BATCHED_TOKENS)
    k = VllmKnobs(gpu_memory_utilization=util, max_model_len=ctx, max_num_seqs=seqs,
                  max_num_batched_tokens=mnbt, max_pixels=spec.processor_max_pixels,
                  image_limit=DEFAULT_IMAGE_LIMIT, tensor_parallel_size=card.count)
    b = predict(spec, k, total=card.total, free=card.free)
    plan = _plan(spec, card, b, ctx, fits=not b.errors and b.kv_available - margin(b) >= b.kv_needed)
    plan.evaluated = True
    plan.vllm_args = ["--gpu-memory-utilization", f"{util:g}", "--max-model-len", str(ctx)]
    if card.count > 1:
        plan.vllm_args += ["--tensor-parallel-size", str(card.count)]
    plan.vllm_args += TOOL_CALLING_ARGS
    plan.notes.append("evaluated: vLLM's defaults for every flag but --gpu-memory-utilization and "
                      f"--max-model-len and tool calling (images up to {spec.processor_max_pixels} pixels, "
                      f"{seqs} sequences, CUDA graphs)")
    return VllmOutcome(plan, b)


def _plan(spec: ModelSpec, card: Card, b: VllmBudget, context: int, *, fits: bool,
          batch: BatchChoice | None = None) -> Plan:
    return Plan(fits=fits, profile="16gb", model=spec.id, context=context,
                required_free_bytes=b.requested + b.outside_requested + START_SLACK_BYTES,
                budget=_budget_rows(b, card, context, batch), **card.plan_fields(), kv_cache_tokens=b.kv_tokens,
                concurrent_sequences=round(b.kv_tokens / max(context, 1), 2))


def vllm_args(k: VllmKnobs) -> list[str]:
    args = ["--gpu-memory-utilization", f"{k.gpu_memory_utilization:.2f}",
            "--max-model-len", str(k.max_model_len),
            "--max-num-seqs", str(k.max_num_seqs),
            "--max-num-batched-tokens", str(k.max_num_batched_tokens),
            "--limit-mm-per-prompt", json.dumps({"image": k.image_limit, "video": 0}, separators=(",", ":")),
            "--mm-processor-kwargs", json.dumps({"max_pixels": k.max_pixels}, separators=(",", ":")),
            "--kv-cache-dtype", k.kv_cache_dtype]
    if k.enforce_eager:
        args.append("--enforce-eager")
    if k.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(k.tensor_parallel_size)]
    return args + TOOL_CALLING_ARGS


def knobs_from_args(args: list[str], spec: ModelSpec) -> VllmKnobs:
    """The memory knobs of a `vllm serve` command line (the inverse of vllm_args; vLLM's defaults for
    small cards where a flag is missing): to predict a command that was run."""
    def flag(name: str, default=None):
        return args[args.index(name) + 1] if name in args else default
    seqs = int(flag("--max-num-seqs", DEFAULT_MAX_NUM_SEQS))
    ctx = int(flag("--max-model-len", spec.text.max_position))
    limits = json.loads(flag("--limit-mm-per-prompt", "{}"))
    return VllmKnobs(
        gpu_memory_utilization=float(flag("--gpu-memory-utilization", 0.9)), max_model_len=ctx, max_num_seqs=seqs,
        max_num_batched_tokens=int(flag("--max-num-batched-tokens", DEFAULT_MAX_NUM_BATCHED_TOKENS)),
        max_pixels=int(json.loads(flag("--mm-processor-kwargs", "{}")).get("max_pixels", spec.processor_max_pixels)),
        image_limit=int(limits.get("image", DEFAULT_IMAGE_LIMIT)), kv_cache_dtype=flag("--kv-cache-dtype", "auto"),
        enforce_eager="--enforce-eager" in args, tensor_parallel_size=int(flag("--tensor-parallel-size", 1)))


def _budget_rows(b: VllmBudget, card: Card, context: int, batch: BatchChoice | None) -> list[BudgetRow]:
    g = lambda n: round(n / GIB, 2)  # noqa: E731
    k = b.knobs
    others = card.total - card.free
    enc_act = b.encoder_peak - b.encoder_cache
    dec_act = b.decoder_peak - b.encoder_cache
    rows = [
        BudgetRow(name="GPU memory", gib=g(card.total), note=card.label),
        BudgetRow(name="other processes", gib=g(others),
                  note="measured (NVML)" if card.measured else "assumed: a desktop's share"),
        BudgetRow(name="CUDA context (vLLM)", gib=g(b.outside_requested),
                  note="outside gpu_memory_utilization" + (", with NCCL's buffers" if k.tensor_parallel_size > 1 else "")),
        BudgetRow(name="vLLM's share", gib=g(b.requested),
                  note=f"--gpu-memory-utilization {k.gpu_memory_utilization:.2f} x total"),
        BudgetRow(name="  weights", gib=g(b.weights),
                  note=f"per GPU, tp={k.tensor_parallel_size}: parameters + rotary cache + DeepStack buffers, "
                       "as the allocator counts them"),
        BudgetRow(name="  activations (profiling peak)", gib=g(max(enc_act, dec_act)),
                  note=(f"vision: {b.profiled_images} dummy image(s) x {b.image_tokens} tokens "
                        f"= {g(enc_act)} GiB; decoder {k.max_num_batched_tokens} tokens, sampler "
                        f"{k.max_num_seqs} rows ({g(b.sampler)} GiB) = {g(dec_act)} GiB")),
        BudgetRow(name="  encoder cache", gib=g(b.encoder_cache),
                  note="dummy images' embeddings, held through the decoder pass"),
        BudgetRow(name="  non-torch", gib=g(b.non_torch), note="cuBLAS/attention workspaces"),
        BudgetRow(name="  CUDA graphs", gib=g(b.cuda_graphs),
                  note="--enforce-eager: none" if k.enforce_eager else f"vLLM's capture estimate, {b.graphs} graphs"),
        BudgetRow(name="  KV cache", gib=g(b.kv_available),
                  note=f"{b.kv_tokens} tokens ({k.kv_cache_dtype}), "
                       f"{b.kv_bytes_per_token // 1024} KiB/token"),
        BudgetRow(name="  margin (inside KV cache)", gib=g(margin(b)),
                  note="kept beyond the context for estimate error"),
        BudgetRow(name="concurrent sequences", gib=round(b.kv_tokens / max(context, 1), 2),
                  note=f"full {context}-token sequences the KV cache holds (a count, not GiB)"),
    ]
    if batch is not None:
        rows += [
            BudgetRow(name="--max-num-seqs", gib=k.max_num_seqs,
                      note=f"a count: the KV cache holds {batch.requests_held} image requests of "
                           f"{batch.typical_tokens} tokens at once; {k.max_num_seqs} sequences and "
                           f"{k.max_num_batched_tokens} batched tokens cost {g(batch.cost)} GiB of KV cache "
                           f"beyond {MIN_MAX_NUM_SEQS} and {BATCHED_TOKEN_STEPS[0]} (at most "
                           f"{THROUGHPUT_SHARE:.0%} of it)"),
            BudgetRow(name="--max-num-batched-tokens", gib=k.max_num_batched_tokens,
                      note=f"a count: tokens a step prefills; the profiling run encodes {b.profiled_images} "
                           f"dummy image(s) for it"),
        ]
    rows.append(BudgetRow(name="left on the card", gib=g(card.total - others - b.outside_requested - b.requested),
                          note="not used by vLLM"))
    return rows
