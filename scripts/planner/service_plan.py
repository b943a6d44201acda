"""The 8gb profile's ladder: `VLKIT_*` settings of vlkit's service that fit the card (no advice).

The service is sized as it sizes itself (service_memory.py): with no --context, a context of 4096
with KV blocks for two full-length sequences, else 2048 (then one); the weights in each format the
checkpoint runs in (a bf16 one as it is, then quantized to fp8; an FP8 one as it is), each with
full-size images before smaller ones; nf4 only where none of that fits. When nothing fits, the plan
shows the cheapest attempt and the longest context that would.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from service.settings import ENV_PREFIX, ServiceSettings
from service.sizing import DECODE_BATCH_SIZES, DEFAULT_BATCHED_TOKENS, GIB, MIB

from .card import START_SLACK_BYTES, Card
from .models import ModelSpec, WeightFormat
from .schema import BudgetRow, Plan
from .service_memory import ServiceBudget, ServiceKnobs, images_that_fit, predict_service
from .targets import IMAGE_LIMIT, MIN_BATCH, PIXEL_STEPS, min_useful_context, round_context

SERVICE_CONTEXTS = (4096, 2048)   # no --context: 4096 with two full sequences, else 2048
# VLKIT_MAX_BATCH_SIZE: requests decoded at once. The engine admits by KV blocks (short requests share
# them), captures decode graphs for 1, 2, 4, 8, 16, 32 up to it, and an extra row costs little (its
# logits and a graph's activations, inside the headroom); so as many as the blocks hold typical image
# requests, at least MIN_BATCH, at most the largest captured graph. The KV cache holds at most this
# many full-length sequences (blocks beyond go unused).
SERVICE_MAX_BATCH = DECODE_BATCH_SIZES[-1]
# VLKIT_MAX_NUM_BATCHED_TOKENS: prompt tokens of one prefill pass. A larger pass launches each kernel
# once for more prompts (H200, 2B, 32 image requests at once, engine alone: 1.8x the throughput and
# 0.57x the median TTFT at 4096, the pass's images in one vision forward, against 1024) and costs
# activations (a longer decoder pass, more images through the vision tower at once) out of the KV
# cache: the largest step that keeps the rung's full-length sequences and the batch (the typical
# requests the blocks hold, up to SERVICE_MAX_BATCH) that the smallest step gives.
SERVICE_BATCHED_TOKENS = (DEFAULT_BATCHED_TOKENS, 2048, 4096)
WEIGHTS_NOTE: dict[WeightFormat, str] = {"bf16": "bf16", "fp8": "fp8 (128x128 blocks)", "nf4": "nf4 (bitsandbytes)"}


def quantization_setting(spec: ModelSpec, weights: WeightFormat) -> str:
    """VLKIT_QUANTIZATION: an FP8 checkpoint says so in its own quantization_config ("none"); a bf16
    checkpoint is quantized while it loads, to fp8 (the service's FP8 GEMMs) or nf4 (bitsandbytes)."""
    return "none" if weights == "bf16" or (weights == "fp8" and spec.fp8_checkpoint) else weights


@dataclass(frozen=True)
class ServiceOutcome:
    plan: Plan                      # fits, or the cheapest attempt (no settings); no refusal: advice.py
    budget: ServiceBudget           # the prediction behind it


def weight_formats(spec: ModelSpec) -> tuple[WeightFormat, ...]:
    """The formats the service can hold this checkpoint's weights in, preferred first: an FP8
    checkpoint as it is (service/engine/fp8_checkpoint.py loads it offline); a bf16 one as it is, then
    quantized to FP8 while it loads (half the bytes, the same checkpoint format's accuracy), then nf4
    (a quarter; for what FP8 does not fit)."""
    return ("fp8",) if spec.fp8_checkpoint else ("bf16", "fp8", "nf4")


def env_name(field: str) -> str:
    assert field in ServiceSettings.model_fields, field  # the settings are the one source of names
    return f"{ENV_PREFIX}{field.upper()}"


def _budget_setting(card: Card) -> tuple[float, int]:
    """VLKIT_MEMORY_BUDGET_GIB (free less the start slack, down to 0.1 GiB) and the bytes the service
    reads from it (``int(memory_budget_gib * GIB)``)."""
    gib = max(0.0, math.floor((card.free - START_SLACK_BYTES) / GIB * 10) / 10)
    return gib, int(gib * GIB)


def _rungs(spec: ModelSpec, contexts: tuple[int, ...]) -> Iterator[tuple[int, ServiceKnobs]]:
    """(min full-length sequences, knobs) in order of preference: nf4 only where neither bf16 nor fp8
    fits (it loses the most: on an H200 8 concurrent requests made 1.6-4.1x one's aggregate, FP8 3.0-8.0x);
    within that, KV blocks for two sequences of the context before one (and one only at the shortest
    context); the longer context; the weights formats in order (fp8 at 4096 before bf16 at 2048:
    Qwen's own FP8 format is close to bf16); full-size images before smaller ones."""
    formats = weight_formats(spec)
    for group in (tuple(f for f in formats if f != "nf4"), tuple(f for f in formats if f == "nf4")):
        for min_sequences, ctxs in ((2, contexts), (1, contexts[-1:])):
            for ctx in ctxs:
                for weights in group:
                    for px in PIXEL_STEPS:
                        images = images_that_fit(spec, px, IMAGE_LIMIT, ctx)
                        yield min_sequences, ServiceKnobs(weights, px, images, SERVICE_MAX_BATCH, ctx,
                                                          SERVICE_BATCHED_TOKENS[0])


def plan_service(spec: ModelSpec, card: Card, wanted: int | None) -> ServiceOutcome:
    budget_gib, budget = _budget_setting(card)
    for min_sequences, knobs in _rungs(spec, (wanted,) if wanted else SERVICE_CONTEXTS):
        if knobs.max_model_len < min_useful_context(spec, knobs.max_pixels):
            continue
        sb = predict_service(spec, knobs, budget)
        if sb.sequences >= min_sequences:
            sb = _larger_passes(spec, sb, budget, min_sequences)
            sb = predict_service(spec, replace(sb.knobs, max_batch_size=_batch_for(spec, sb)), budget)
            return ServiceOutcome(_plan(spec, card, sb, budget_gib, fits=True), sb)
    # Nothing fits: show the cheapest attempt (the last format, the smallest images) and the context
    # it would hold.
    cheapest, px = weight_formats(spec)[-1], PIXEL_STEPS[-1]
    target = wanted or SERVICE_CONTEXTS[-1]
    sb = predict_service(spec, ServiceKnobs(cheapest, px, images_that_fit(spec, px, IMAGE_LIMIT, target),
                                            SERVICE_MAX_BATCH, target, SERVICE_BATCHED_TOKENS[0]), budget)
    plan = _plan(spec, card, sb, budget_gib, fits=False)
    plan.context = _largest_context(spec, budget, cheapest, px, below=target)
    return ServiceOutcome(plan, sb)


def _larger_passes(spec: ModelSpec, floor: ServiceBudget, budget: int, min_sequences: int) -> ServiceBudget:
    """The rung with the largest SERVICE_BATCHED_TOKENS step the rule allows (``floor``: at the smallest)."""
    chosen = floor
    for tokens in SERVICE_BATCHED_TOKENS[1:]:
        sb = predict_service(spec, replace(floor.knobs, batched_tokens=tokens), budget)
        if sb.sequences < min_sequences or _requests_held(spec, sb) < _requests_held(spec, floor):
            break
        chosen = sb
    return chosen


def _requests_held(spec: ModelSpec, sb: ServiceBudget) -> int:
    """Typical image requests (min_useful_context each) the KV blocks hold at once, up to SERVICE_MAX_BATCH."""
    return min(SERVICE_MAX_BATCH, sb.kv.tokens // min_useful_context(spec, sb.knobs.max_pixels))


def _batch_for(spec: ModelSpec, sb: ServiceBudget) -> int:
    """VLKIT_MAX_BATCH_SIZE: the typical image requests the KV blocks hold at once (planned with the
    blocks capped at SERVICE_MAX_BATCH full sequences), between MIN_BATCH and SERVICE_MAX_BATCH."""
    return max(MIN_BATCH, _requests_held(spec, sb))


def _largest_context(spec: ModelSpec, budget: int, weights: WeightFormat, max_pixels: int, *, below: int) -> int:
    """The longest context (a multiple of 256) below `below` whose KV blocks hold one full sequence
    (0 if none)."""
    ctx = round_context(below - 1)
    while ctx >= 256:
        knobs = ServiceKnobs(weights, max_pixels, images_that_fit(spec, max_pixels, IMAGE_LIMIT, ctx), 1, ctx,
                             SERVICE_BATCHED_TOKENS[0])
        if predict_service(spec, knobs, budget).fits:
            return ctx
        ctx -= 256
    return 0


def _plan(spec: ModelSpec, card: Card, sb: ServiceBudget, budget_gib: float, *, fits: bool) -> Plan:
    k = sb.knobs
    plan = Plan(fits=fits, profile="8gb", model=spec.id, context=k.max_model_len, **card.plan_fields(),
                required_free_bytes=sb.kv.used + START_SLACK_BYTES, kv_cache_tokens=sb.kv.tokens,
                concurrent_sequences=float(sb.sequences), budget=_budget_rows(sb, card, budget_gib))
    if fits:
        plan.service_env = {
            env_name("model"): spec.id,
            env_name("dtype"): "auto",
            env_name("quantization"): quantization_setting(spec, k.weights),
            env_name("max_pixels"): str(k.max_pixels),
            env_name("max_images_per_request"): str(sb.prefill.images),
            env_name("max_batch_size"): str(k.max_batch_size),
            env_name("max_num_batched_tokens"): str(k.batched_tokens),
            env_name("max_model_len"): str(k.max_model_len),
            env_name("memory_budget_gib"): f"{budget_gib:.1f}",
        }
    plan.notes.append(f"chosen: {k.weights} weights, batch up to {k.max_batch_size} ({sb.sequences} full-length), "
                      f"max_pixels {k.max_pixels}, prefill passes of {k.batched_tokens} tokens")
    return plan


def _budget_rows(sb: ServiceBudget, card: Card, budget_gib: float) -> list[BudgetRow]:
    g = lambda n: round(n / GIB, 2)  # noqa: E731
    k, kv, pre = sb.knobs, sb.kv, sb.prefill
    ctx = k.max_model_len
    return [
        BudgetRow(name="GPU memory", gib=g(card.total), note=card.label),
        BudgetRow(name="other processes", gib=g(card.total - card.free),
                  note="measured (NVML)" if card.measured else "assumed: a desktop's share"),
        BudgetRow(name="service budget", gib=budget_gib, note="VLKIT_MEMORY_BUDGET_GIB: the whole process"),
        BudgetRow(name="  weights", gib=g(sb.weights), note=WEIGHTS_NOTE[k.weights]),
        BudgetRow(name="  CUDA context", gib=g(sb.cuda_context), note="+ cuBLAS/attention workspaces (measured)"),
        BudgetRow(name="  prefill reserve", gib=g(pre.reserve),
                  note=(f"largest request: {pre.images} image(s) of {pre.image_tokens} tokens, {pre.vision_batch} "
                        f"at a time, text in {k.batched_tokens}-token passes to {ctx - 1} tokens: images held "
                        f"{pre.images_held / GIB:.2f} + "
                        f"max(vision {pre.vision_peak / GIB:.2f}, decoder {pre.decoder_peak / GIB:.2f}) + "
                        f"{pre.fixed / MIB:.0f} MiB")),
        BudgetRow(name="  headroom", gib=g(kv.headroom), note="decode graphs' pool, allocator rounding"),
        BudgetRow(name="  KV cache", gib=g(kv.kv_bytes),
                  note=f"{kv.tokens} tokens in {kv.blocks} blocks of {kv.block_size} + 1 scratch ({sb.sequences} full "
                       f"{ctx}-token sequences), bf16, {sb.kv_bytes_per_token // 1024} KiB/token"),
        BudgetRow(name="  unused", gib=g(kv.budget - kv.used),
                  note=f"less than one more block ({kv.block_bytes / MIB:.0f} MiB), or beyond {k.max_batch_size} "
                       "full sequences (the batch cap)"),
        BudgetRow(name="concurrent sequences", gib=float(sb.sequences),
                  note=f"full {ctx}-token sequences (a count, not GiB); shorter requests share the blocks, "
                       f"up to {k.max_batch_size} at once"),
    ]
