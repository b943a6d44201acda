"""plan_for(): the settings that fit a card, or a refusal that names the next step.

16gb profile: vLLM with --gpu-memory-utilization from the free memory, then the largest context
the predicted KV cache holds after a margin. When it does not reach the wanted context, the
planner steps down, in this order: fp8 KV cache, eager mode (no CUDA graphs), smaller images.
8gb profile: vlkit's transformers service, sized as the service sizes itself (service_memory.py): a
context of 4096 with KV blocks for two full-length sequences, else 2048 (then one); bf16, then nf4
weights; then smaller images.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from service.settings import ENV_PREFIX, ServiceSettings

from .models import ModelSpec, resolve_model, variants_to_try
from .service_memory import (
    BLOCK_SIZE, PREFILL_CHUNK, ServiceBudget, ServiceKnobs, blocks_for, images_that_fit, predict_service,
)
from .vllm_memory import (
    CUDA_CONTEXT_BYTES, DEFAULT_IMAGE_LIMIT, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS,
    LARGE_GPU_BYTES, LARGE_MAX_NUM_BATCHED_TOKENS, LARGE_MAX_NUM_SEQS, VllmBudget, VllmKnobs,
    max_image_tokens, predict,
)

GIB = 1024**3
MIB = 1024**2
Profile = Literal["8gb", "16gb"]

# Planning a card by its size (--gpu-memory): what a desktop holds on it. The seeds' WSL2 machine
# showed Xwayland 623 MB + ~200 MB for the system on an 8 GB card.
DESKTOP_RESERVE_BYTES = 800 * MIB
START_SLACK_BYTES = 192 * MIB      # free memory moves between planning and start-up
UTIL_CAP = 0.95
DEFAULT_CONTEXT = 8192             # the context the planner aims for when none is asked for
CONTEXT_CAP = 32768                # more only when asked for (--context)
PROMPT_TOKENS = 256                # the text of a prompt beside its image
SERVICE_CONTEXTS = (4096, 2048)   # 8gb, no --context: 4096 with two full sequences, else 2048
# VLKIT_MAX_BATCH_SIZE: requests decoded at once. Short requests share the KV blocks (the engine admits
# by blocks), so the cap is the latency trade, not the full-length sequences that fit; the KV cache
# holds at most this many full-length sequences (blocks beyond go unused).
SERVICE_MAX_BATCH = 8
SERVICE_MAX_IMAGES = 4             # images per request (both profiles), fewer where the context is short
_DEFAULTS = ServiceSettings.model_fields
DEFAULT_MAX_PIXELS = _DEFAULTS["max_pixels"].default            # ~1000 image tokens
PIXEL_STEPS = tuple(p for p in (DEFAULT_MAX_PIXELS, 802_816, 602_112, 401_408, 200_704)
                    if p <= DEFAULT_MAX_PIXELS)
ANSWER_TOKENS = _DEFAULTS["max_tokens_default"].default
IMAGE_LIMIT = SERVICE_MAX_IMAGES


class BudgetRow(BaseModel):
    name: str
    gib: float
    note: str = ""


class Plan(BaseModel):
    fits: bool
    profile: Profile
    model: str
    context: int
    vllm_args: list[str] = Field(default_factory=list)
    service_env: dict[str, str] = Field(default_factory=dict)
    required_free_bytes: int = 0
    refusal: str | None = None
    budget: list[BudgetRow] = Field(default_factory=list)
    gpu: str = ""
    gpu_total_bytes: int = 0
    gpu_free_bytes: int = 0
    gpu_count: int = 1
    kv_cache_tokens: int = 0
    concurrent_sequences: float = 0.0
    evaluated: bool = False           # --gpu-memory-utilization given: vLLM's defaults evaluated
    vllm_version: str = ""
    notes: list[str] = Field(default_factory=list)

    def to_dict(self) -> dict:
        return self.model_dump()


@dataclass(frozen=True)
class Card:
    total: int
    free: int
    count: int
    label: str
    measured: bool


def _vllm_version() -> str:
    try:
        from scripts.images import VLLM_VERSION
        return VLLM_VERSION
    except ImportError:  # pragma: no cover - the docker area always ships it
        return "unknown"


def _card(gpus, gpu_memory_bytes: int | None, gpu_count: int) -> Card:
    if gpu_count < 1:
        raise ValueError("--gpus must be at least 1")
    if gpu_memory_bytes is not None:
        return Card(gpu_memory_bytes, max(0, gpu_memory_bytes - DESKTOP_RESERVE_BYTES), gpu_count,
                    f"{gpu_count} x {gpu_memory_bytes / GIB:.1f} GiB (planned; {DESKTOP_RESERVE_BYTES // MIB} MiB "
                    f"assumed for the desktop)", False)
    if gpus is None:
        from scripts.gpu import detect_gpus  # lazily: NVML is only needed when nothing was given
        gpus = detect_gpus()
    if not gpus:
        raise ValueError("no NVIDIA GPU found: plan for a card with --gpu-memory (e.g. --gpu-memory 8GiB)")
    if gpu_count > len(gpus):
        raise ValueError(f"--gpus {gpu_count}, but {len(gpus)} GPU(s) found")
    # The first N by index: compose reserves `count: N` GPUs, which Docker takes from index 0 (the
    # health gate and the doctor look at GPU 0 too), so planning for the emptiest card would plan
    # for a GPU the container does not get.
    used = sorted(gpus, key=lambda g: g.index)[:gpu_count]
    # Tensor parallel ranks are equal: the smallest card and the least free memory bound them all.
    total, free = min(g.total_bytes for g in used), min(g.free_bytes for g in used)
    names = ", ".join(sorted({g.name for g in used}))
    return Card(total, free, gpu_count, f"{gpu_count} x {names} ({total / GIB:.2f} GiB, "
                f"{free / GIB:.2f} GiB free)", True)


def min_useful_context(spec: ModelSpec, max_pixels: int) -> int:
    """One image at max_pixels, a prompt and a default-length answer."""
    return max_image_tokens(max_pixels, spec) + PROMPT_TOKENS + ANSWER_TOKENS


def _round_context(tokens: int) -> int:
    return tokens // 256 * 256 if tokens >= 512 else tokens // 16 * 16


def _margin(b: VllmBudget) -> int:
    """What the estimate may be off by: 256 MiB plus 15% of what is estimated rather than known."""
    return 256 * MIB + int(0.15 * (b.activations + b.cuda_graphs + b.non_torch))


def _capacity(b: VllmBudget) -> int:
    """Context one sequence may have while the margin stays in the KV cache."""
    usable = b.kv_available - _margin(b)
    return max(0, usable // (16 * b.kv_bytes_per_token)) * 16


# ---------------------------------------------------------------------------------------- 16gb
@dataclass
class _VllmChoice:
    budget: VllmBudget
    context: int
    rung: str


def _util_for(card: Card) -> float:
    room = card.free - CUDA_CONTEXT_BYTES - START_SLACK_BYTES
    return max(0.0, min(UTIL_CAP, math.floor(room / card.total * 100) / 100))


def _vllm_rungs() -> list[tuple[str, str, bool, int]]:
    first = PIXEL_STEPS[0]
    rungs = [("bf16 KV cache, CUDA graphs", "auto", False, first),
             ("fp8 KV cache, CUDA graphs", "fp8", False, first),
             ("fp8 KV cache, eager", "fp8", True, first)]
    rungs += [(f"fp8 KV cache, eager, max_pixels {p}", "fp8", True, p) for p in PIXEL_STEPS[1:]]
    return rungs


def _try_vllm(spec: ModelSpec, card: Card, wanted: int | None) -> tuple[_VllmChoice | None, _VllmChoice | None]:
    """(the choice that fits, the best attempt) over the ladder of rungs."""
    util = _util_for(card)
    seqs = 16 if card.total >= 20 * GIB else 8
    target = wanted or DEFAULT_CONTEXT
    best: _VllmChoice | None = None
    fallback: _VllmChoice | None = None
    for step, (name, kv, eager, px) in enumerate(_vllm_rungs()):
        def predict_at(ctx: int) -> VllmBudget:
            return predict(spec, VllmKnobs(
                gpu_memory_utilization=util, max_model_len=max(ctx, 16), max_num_seqs=seqs,
                max_num_batched_tokens=DEFAULT_MAX_NUM_BATCHED_TOKENS, max_pixels=px,
                image_limit=IMAGE_LIMIT, kv_cache_dtype=kv, enforce_eager=eager,
                tensor_parallel_size=card.count), total=card.total, free=card.free)
        b = predict_at(target)
        cap = min(_capacity(b), spec.text.max_position)
        if wanted:
            ctx = wanted
        else:  # the context changes how many dummy images fit a prompt: predict again at it
            b = predict_at(_round_context(min(cap, CONTEXT_CAP)))
            cap = min(_capacity(b), spec.text.max_position)
            ctx = _round_context(min(cap, CONTEXT_CAP))
        ok = util > 0 and not b.errors and cap >= ctx >= min_useful_context(spec, px)
        if ok and ctx >= target and step and not wanted:
            # Stepped down to reach the target: take the target, not more (so a larger card, which
            # keeps more of the quality, never gets a shorter context).
            ctx, b = target, predict_at(target)
        choice = _VllmChoice(b, ctx, name)
        if ok and ctx >= target:
            return choice, choice
        if ok and not wanted and (fallback is None or ctx > fallback.context):
            fallback = choice
        if best is None or min(cap, target) > best.context:
            best = _VllmChoice(b, min(cap, target), name)
    return fallback, (fallback or best)


def _vllm_args(k: VllmKnobs, served: str | None = None) -> list[str]:
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
    return args


def _vllm_budget_rows(b: VllmBudget, card: Card, context: int) -> list[BudgetRow]:
    g = lambda n: round(n / GIB, 2)  # noqa: E731
    k = b.knobs
    others = card.total - card.free
    enc_act = b.encoder_peak - b.encoder_cache
    dec_act = b.decoder_peak - b.encoder_cache
    rows = [
        BudgetRow(name="GPU memory", gib=g(card.total), note=card.label),
        BudgetRow(name="other processes", gib=g(others),
                  note="measured (NVML)" if card.measured else "assumed: a desktop's share"),
        BudgetRow(name="CUDA context (vLLM)", gib=g(CUDA_CONTEXT_BYTES), note="outside gpu_memory_utilization"),
        BudgetRow(name="vLLM's share", gib=g(b.requested),
                  note=f"--gpu-memory-utilization {k.gpu_memory_utilization:.2f} x total"),
        BudgetRow(name="  weights", gib=g(b.weights), note=f"per GPU, tp={k.tensor_parallel_size}"),
        BudgetRow(name="  activations (profiling peak)", gib=g(max(enc_act, dec_act)),
                  note=(f"vision: {b.profiled_images} dummy image(s) x {b.image_tokens} tokens "
                        f"= {g(enc_act)} GiB; decoder {k.max_num_batched_tokens} tokens + sampler "
                        f"{k.max_num_seqs} rows = {g(dec_act)} GiB")),
        BudgetRow(name="  encoder cache", gib=g(b.encoder_cache),
                  note="dummy images' embeddings, held through the decoder pass"),
        BudgetRow(name="  non-torch", gib=g(b.non_torch), note="cuBLAS/attention workspaces" +
                  (", NCCL" if k.tensor_parallel_size > 1 else "")),
        BudgetRow(name="  CUDA graphs", gib=g(b.cuda_graphs),
                  note="--enforce-eager: none" if k.enforce_eager else "vLLM's capture estimate"),
        BudgetRow(name="  KV cache", gib=g(b.kv_available),
                  note=f"{b.kv_tokens} tokens ({k.kv_cache_dtype}), "
                       f"{b.kv_bytes_per_token // 1024} KiB/token"),
        BudgetRow(name="  margin (inside KV cache)", gib=g(_margin(b)),
                  note="kept beyond the context for estimate error"),
        BudgetRow(name="concurrent sequences", gib=round(b.kv_tokens / max(context, 1), 2),
                  note=f"full {context}-token sequences the KV cache holds (a count, not GiB)"),
        BudgetRow(name="left on the card", gib=g(card.total - others - CUDA_CONTEXT_BYTES - b.requested),
                  note="not used by vLLM"),
    ]
    return rows


def _plan_vllm(spec: ModelSpec, card: Card, wanted: int | None, *, suggest: bool = True) -> Plan:
    choice, best = _try_vllm(spec, card, wanted)
    shown = choice or best
    b = shown.budget
    k = b.knobs
    plan = Plan(fits=choice is not None, profile="16gb", model=spec.id, context=shown.context,
                vllm_args=_vllm_args(VllmKnobs(**{**k.__dict__, "max_model_len": max(shown.context, 16)})),
                required_free_bytes=b.requested + CUDA_CONTEXT_BYTES + START_SLACK_BYTES,
                budget=_vllm_budget_rows(b, card, shown.context), gpu=card.label,
                gpu_total_bytes=card.total, gpu_free_bytes=card.free, gpu_count=card.count,
                kv_cache_tokens=b.kv_tokens, concurrent_sequences=round(b.kv_tokens / max(shown.context, 1), 2),
                vllm_version=_vllm_version())
    plan.notes.append(f"chosen: {shown.rung}" if choice else f"best attempt: {shown.rung}")
    if choice is None:
        plan.vllm_args = []
    if choice is None and suggest:
        plan.refusal = _vllm_refusal(spec, card, wanted, best)
    elif choice is None:
        plan.refusal = "does not fit"
    return plan


def _vllm_refusal(spec: ModelSpec, card: Card, wanted: int | None, best: _VllmChoice) -> str:
    b = best.budget
    why = b.errors[0] if b.errors else (
        f"vLLM would start, but its KV cache holds {best.context} tokens after the margin, "
        f"{'less than the ' + str(wanted) + ' asked for' if wanted else 'less than one image needs'}")
    tried = f"Tried: bf16/fp8 KV cache, eager mode, max_pixels down to {PIXEL_STEPS[-1]}."
    return f"{why}. {tried} {_next_steps(spec, card, wanted, best.context, tried='16gb')}"


# ----------------------------------------------------------------------------------------- 8gb
def _env_name(field: str) -> str:
    assert field in ServiceSettings.model_fields, field  # the settings are the one source of names
    return f"{ENV_PREFIX}{field.upper()}"


def _service_budget_bytes(card: Card) -> tuple[float, int]:
    """VLKIT_MEMORY_BUDGET_GIB (free less the start slack, down to 0.1 GiB) and the bytes the service
    reads from it (``int(memory_budget_gib * GIB)``)."""
    gib = max(0.0, math.floor((card.free - START_SLACK_BYTES) / GIB * 10) / 10)
    return gib, int(gib * GIB)


def _service_steps(spec: ModelSpec, contexts: tuple[int, ...]):
    """(min full-length sequences, knobs) in order of preference: KV blocks for two sequences of the
    context before one (and one only at the shortest context); the longer context; bf16 before nf4;
    full-size images before smaller ones."""
    for min_sequences, ctxs in ((2, contexts), (1, contexts[-1:])):
        for ctx in ctxs:
            for quant in ("none", "nf4"):
                for px in PIXEL_STEPS:
                    images = images_that_fit(spec, px, SERVICE_MAX_IMAGES, ctx)
                    yield min_sequences, ServiceKnobs(quant, px, images, SERVICE_MAX_BATCH, ctx)


def _plan_service(spec: ModelSpec, card: Card, wanted: int | None, *, suggest: bool = True) -> Plan:
    base = Plan(fits=False, profile="8gb", model=spec.id, context=wanted or 0, gpu=card.label,
                gpu_total_bytes=card.total, gpu_free_bytes=card.free, gpu_count=card.count,
                vllm_version=_vllm_version())
    if spec.fp8_checkpoint:
        bf16_id = spec.id[: -len("-FP8")] if spec.id.endswith("-FP8") else None
        base.refusal = ("the 8gb profile (transformers) cannot run FP8 checkpoints offline: its FP8 path "
                        "fetches kernels from the Hugging Face hub at the first forward. ")
        if bf16_id and suggest:
            alt = _plan_service(resolve_model(bf16_id), card, wanted, suggest=False)
            base.refusal += (f"Next step: --model {bf16_id} --profile 8gb" +
                             (f" (fits: {_weights_word(alt)} weights, "
                              f"context {alt.context})." if alt.fits else " (does not fit either)."))
        return base
    budget_gib, budget = _service_budget_bytes(card)
    contexts = (wanted,) if wanted else SERVICE_CONTEXTS
    for min_sequences, knobs in _service_steps(spec, contexts):
        if knobs.max_model_len < min_useful_context(spec, knobs.max_pixels):
            continue
        sb = predict_service(spec, knobs, budget)
        if sb.sequences >= min_sequences:
            return _service_plan(base, spec, card, sb, budget_gib)
    # Nothing fits: show the cheapest attempt (nf4, the smallest images) and the context it would hold.
    px = PIXEL_STEPS[-1]
    target = wanted or SERVICE_CONTEXTS[-1]
    sb = predict_service(spec, ServiceKnobs("nf4", px, images_that_fit(spec, px, SERVICE_MAX_IMAGES, target),
                                            SERVICE_MAX_BATCH, target), budget)
    best = _largest_service_context(spec, budget, px, below=target)
    plan = _service_plan(base, spec, card, sb, budget_gib)
    plan.fits, plan.service_env, plan.context = False, {}, best
    need = min_useful_context(spec, px)
    blocks = blocks_for(target)
    one = sb.resident + sb.prefill_reserve + sb.headroom + (blocks + 1) * sb.block_bytes
    why = (f"the service needs {one / GIB:.2f} GiB for one {target}-token sequence (nf4 weights "
           f"{sb.weights / GIB:.2f} GiB, prefill reserve {sb.prefill_reserve / GIB:.2f} GiB, KV cache "
           f"{(blocks + 1) * sb.block_bytes / GIB:.2f} GiB: {blocks} blocks of {BLOCK_SIZE} tokens + the scratch "
           f"block) but its budget is {budget / GIB:.2f} GiB")
    if wanted and best >= need:
        why = f"the largest context that fits is {best} tokens, less than the {wanted} asked for"
    plan.refusal = f"{why}. " + (_next_steps(spec, card, wanted, best, tried="8gb") if suggest else "")
    return plan


def _largest_service_context(spec: ModelSpec, budget: int, max_pixels: int, *, below: int) -> int:
    """The longest context (a multiple of 256) below `below` whose KV blocks hold one full sequence,
    nf4 weights (0 if none)."""
    ctx = _round_context(below - 1)
    while ctx >= 256:
        knobs = ServiceKnobs("nf4", max_pixels, images_that_fit(spec, max_pixels, SERVICE_MAX_IMAGES, ctx), 1, ctx)
        if predict_service(spec, knobs, budget).fits:
            return ctx
        ctx -= 256
    return 0


def _weights_word(plan: Plan) -> str:
    return "nf4" if plan.service_env.get(_env_name("quantization")) == "nf4" else "bf16"


def _service_plan(base: Plan, spec: ModelSpec, card: Card, sb: ServiceBudget, budget_gib: float) -> Plan:
    g = lambda n: round(n / GIB, 2)  # noqa: E731
    k = sb.knobs
    ctx = k.max_model_len
    plan = base.model_copy(deep=True)
    plan.fits, plan.context, plan.refusal = True, ctx, None
    plan.service_env = {
        _env_name("model"): spec.id,
        _env_name("dtype"): "auto",
        _env_name("quantization"): k.quantization,
        _env_name("max_pixels"): str(k.max_pixels),
        _env_name("max_images_per_request"): str(sb.images),
        _env_name("max_batch_size"): str(k.max_batch_size),
        _env_name("max_model_len"): str(ctx),
        _env_name("memory_budget_gib"): f"{budget_gib:.1f}",
    }
    plan.required_free_bytes = sb.total + START_SLACK_BYTES
    plan.kv_cache_tokens = sb.tokens
    plan.concurrent_sequences = float(sb.sequences)
    weights = "nf4 (bitsandbytes)" if k.quantization == "nf4" else "bf16"
    plan.budget = [
        BudgetRow(name="GPU memory", gib=g(card.total), note=card.label),
        BudgetRow(name="other processes", gib=g(card.total - card.free),
                  note="measured (NVML)" if card.measured else "assumed: a desktop's share"),
        BudgetRow(name="service budget", gib=budget_gib, note="VLKIT_MEMORY_BUDGET_GIB: the whole process"),
        BudgetRow(name="  weights", gib=g(sb.weights), note=weights),
        BudgetRow(name="  CUDA context", gib=g(sb.cuda_context), note="+ cuBLAS/attention workspaces (measured)"),
        BudgetRow(name="  prefill reserve", gib=g(sb.prefill_reserve),
                  note=(f"largest request: {sb.images} image(s) of {sb.image_tokens} tokens one at a time, text in "
                        f"{PREFILL_CHUNK}-token chunks to {ctx - 1} tokens: images held {sb.images_held / GIB:.2f} + "
                        f"max(vision {sb.vision_peak / GIB:.2f}, decoder {sb.decoder_peak / GIB:.2f}) + "
                        f"{sb.prefill_fixed / MIB:.0f} MiB")),
        BudgetRow(name="  headroom", gib=g(sb.headroom), note="decode graphs' pool, allocator rounding"),
        BudgetRow(name="  KV cache", gib=g(sb.kv),
                  note=f"{sb.tokens} tokens in {sb.blocks} blocks of {BLOCK_SIZE} + 1 scratch ({sb.sequences} full "
                       f"{ctx}-token sequences), bf16, {sb.kv_bytes_per_token // 1024} KiB/token"),
        BudgetRow(name="  unused", gib=g(sb.budget - sb.total),
                  note=f"less than one more block ({sb.block_bytes / MIB:.0f} MiB), or beyond {k.max_batch_size} "
                       "full sequences (the batch cap)"),
        BudgetRow(name="concurrent sequences", gib=plan.concurrent_sequences,
                  note=f"full {ctx}-token sequences (a count, not GiB); shorter requests share the blocks, "
                       f"up to {k.max_batch_size} at once"),
    ]
    plan.notes.append(f"chosen: {'nf4' if k.quantization == 'nf4' else 'bf16'} weights, batch up to "
                      f"{k.max_batch_size} ({sb.sequences} full-length), max_pixels {k.max_pixels}")
    return plan


# -------------------------------------------------------------------------------- next steps
def _next_steps(spec: ModelSpec, card: Card, wanted: int | None, best_context: int, *, tried: str) -> str:
    steps: list[str] = []
    useful = min_useful_context(spec, PIXEL_STEPS[0])
    if wanted and best_context >= min_useful_context(spec, PIXEL_STEPS[-1]) and best_context < wanted:
        steps.append(f"a shorter context: --context {best_context}")
    if tried == "16gb":
        p8 = _plan_service(spec, card, wanted, suggest=False)
        if p8.fits:
            steps.append(f"the 8gb profile: --profile 8gb ({_weights_word(p8)} "
                         f"weights, context {p8.context})")
    else:
        p16 = _plan_vllm(spec, card, wanted, suggest=False)
        if p16.fits:
            steps.append(f"the 16gb profile: --profile 16gb (context {p16.context})")
    for alt_id in variants_to_try(spec):
        alt = resolve_model(alt_id)
        for plan_fn in (_plan_vllm, _plan_service):
            p = plan_fn(alt, card, wanted, suggest=False)
            if p.fits:
                steps.append(f"a smaller or FP8 model: --model {alt_id} (profile {p.profile}, context {p.context})")
                break
        if len(steps) and steps[-1].startswith("a smaller"):
            break
    others = card.total - card.free
    if card.measured and others > GIB:
        steps.append(f"free GPU memory: other processes hold {others / GIB:.2f} GiB")
    if not steps:
        return (f"Next step: none of vlkit's settings fit {card.total / GIB:.1f} GiB; "
                f"one image needs a context of {useful} tokens. Use a GPU with more memory.")
    return "Next step: " + "; or ".join(steps) + "."


# ------------------------------------------------------------------------- evaluate a setting
def _evaluate_vllm(spec: ModelSpec, card: Card, util: float, wanted: int | None) -> Plan:
    """`vllm serve MODEL --gpu-memory-utilization util [--max-model-len wanted]`, everything else at
    vLLM's defaults: what a hand-written command gets."""
    if not 0 < util <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {util}")
    large = card.total >= LARGE_GPU_BYTES
    ctx = wanted or spec.text.max_position
    seqs = LARGE_MAX_NUM_SEQS if large else DEFAULT_MAX_NUM_SEQS
    mnbt = min(seqs * ctx, LARGE_MAX_NUM_BATCHED_TOKENS if large else DEFAULT_MAX_NUM_BATCHED_TOKENS)
    k = VllmKnobs(gpu_memory_utilization=util, max_model_len=ctx, max_num_seqs=seqs,
                  max_num_batched_tokens=mnbt, max_pixels=spec.processor_max_pixels,
                  image_limit=DEFAULT_IMAGE_LIMIT, tensor_parallel_size=card.count)
    b = predict(spec, k, total=card.total, free=card.free)
    fits = not b.errors and b.kv_available - _margin(b) >= b.kv_needed
    args = ["--gpu-memory-utilization", f"{util:g}", "--max-model-len", str(ctx)]
    if card.count > 1:
        args += ["--tensor-parallel-size", str(card.count)]
    plan = Plan(fits=fits, profile="16gb", model=spec.id, context=ctx, vllm_args=args,
                required_free_bytes=b.requested + CUDA_CONTEXT_BYTES + START_SLACK_BYTES,
                budget=_vllm_budget_rows(b, card, ctx), gpu=card.label, gpu_total_bytes=card.total,
                gpu_free_bytes=card.free, gpu_count=card.count, kv_cache_tokens=b.kv_tokens,
                concurrent_sequences=round(b.kv_tokens / ctx, 2), evaluated=True,
                vllm_version=_vllm_version())
    plan.notes.append("evaluated: vLLM's defaults for every flag but --gpu-memory-utilization and "
                      f"--max-model-len (images up to {spec.processor_max_pixels} pixels, "
                      f"{seqs} sequences, CUDA graphs)")
    if not fits:
        why = b.errors[0] if b.errors else (
            f"it would start with {gib_str(b.kv_available)} GiB of KV cache, within the margin of "
            f"the {gib_str(b.kv_needed)} GiB one {ctx}-token sequence needs")
        own = _plan_vllm(spec, card, wanted, suggest=False)
        step = (f"let vlkit choose (drop --gpu-memory-utilization): {' '.join(own.vllm_args)}"
                if own.fits else _next_steps(spec, card, wanted, own.context, tried="16gb").removeprefix("Next step: "))
        plan.refusal = (f"{why}. The profiling run encodes {b.profiled_images} dummy image(s) of "
                        f"{b.image_tokens} tokens ({gib_str(b.encoder_peak)} GiB): --mm-processor-kwargs "
                        f"max_pixels is the lever, not --max-model-len. Next step: {step}")
    return plan


def gib_str(n: int) -> str:
    return f"{n / GIB:.2f}"


# ------------------------------------------------------------------------------------- entry
# `auto` on an 8 GB-class card (6, 8, 10, 11 GB) picks vlkit's service even where the vLLM model
# predicts a fit: there vLLM's margin is thin, its estimate is the least certain part (not yet checked
# against vLLM on a GPU), and a wrong guess is the seeds' failed start. From 12 GiB on, vLLM when it fits.
AUTO_VLLM_MIN_TOTAL = 12 * GIB


def plan_for(*, model: str, profile: Literal["8gb", "16gb", "auto"] = "auto", gpus=None,
             gpu_memory_bytes: int | None = None, gpu_count: int = 1, context: int | None = None,
             gpu_memory_utilization: float | None = None) -> Plan:
    """The settings for `model` on the card(s); see the module docstring and docs/PLANNER.md."""
    if profile not in ("8gb", "16gb", "auto"):
        raise ValueError(f"profile must be 8gb, 16gb or auto, not {profile!r}")
    if context is not None and context < 16:
        raise ValueError(f"--context must be at least 16 tokens, got {context}")
    spec = resolve_model(model)
    if context is not None and context > spec.text.max_position:
        raise ValueError(f"--context {context} exceeds {spec.id}'s maximum of {spec.text.max_position}")
    card = _card(gpus, gpu_memory_bytes, gpu_count)
    if card.count > 1 and spec.text.kv_heads % card.count and card.count % spec.text.kv_heads:
        raise ValueError(f"--gpus {card.count}: tensor parallel needs a count that divides "
                         f"{spec.text.kv_heads} KV heads")
    if gpu_memory_utilization is not None:
        if profile == "8gb":
            raise ValueError("--gpu-memory-utilization is a vLLM setting: use it with --profile 16gb or auto")
        return _evaluate_vllm(spec, card, gpu_memory_utilization, context)
    if profile == "16gb":
        return _plan_vllm(spec, card, context)
    if profile == "8gb":
        return _plan_service(spec, card, context)
    p16 = _plan_vllm(spec, card, context, suggest=False)
    p8 = _plan_service(spec, card, context, suggest=False)
    if card.total < AUTO_VLLM_MIN_TOTAL and p8.fits:
        p8.notes.append(f"auto: a card under {AUTO_VLLM_MIN_TOTAL // GIB} GiB gets vlkit's service "
                        f"(--profile 16gb to try vLLM: {'predicted to fit' if p16.fits else 'predicted not to fit'})")
        return p8
    if p16.fits:
        p16.notes.append("auto: vLLM (16gb profile) fits with a useful context")
        return p16
    if p8.fits:
        p8.notes.append("auto: vLLM does not fit this card with a useful context; vlkit's service does")
        return p8
    p16.refusal = (f"vLLM (16gb): {_vllm_refusal(spec, card, context, _try_vllm(spec, card, context)[1])} "
                   f"vlkit's service (8gb) does not fit either: {p8.refusal.strip()}")
    p16.notes.append("auto: neither profile fits")
    return p16
