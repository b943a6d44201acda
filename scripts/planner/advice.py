"""What the plans mean to the user, written last from the plans already made: auto's choice and
its reason, refusals and their next steps.

plan.py makes every plan a message may name (this model under each profile, a smaller model) before
anything here runs; nothing here plans. Settings are named
as the user typed them (scripts/usage.py: `CONTEXT=2048` under make, `--context 2048` otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

from scripts.usage import setting
from service.sizing import GIB, blocks_for

from .card import Card
from .models import ModelSpec
from .schema import Plan
from .service_plan import ServiceOutcome
from .sizes import gib
from .targets import PIXEL_STEPS, min_useful_context
from .vllm_plan import VllmOutcome

# `auto` on an 8 GB-class card (6, 8, 10, 11 GB) picks vlkit's service where it fits, even where vLLM
# fits too: measured side by side on an emulated 8 GiB card (H200, 2B, 2026-12-01, docs/BENCHMARKS.md)
# the service decoded one request 1.23x faster, served 8 and 32 concurrent image requests 1.04x and
# 1.10x faster and was ready in 49 s instead of 128 s; and there a wrong guess about vLLM's margin is
# the seeds' failed start. From 12 GiB on, vLLM when it fits (it holds longer contexts and more
# sequences there; on the emulated 16 GiB card it served 8 and 32 concurrent requests faster).
AUTO_VLLM_MIN_TOTAL = 12 * GIB
AUTO_SERVICE_MEASURED = ("measured with Qwen3-VL-2B (bf16) on an 8 GiB card: 1.2x vLLM's decode, ready in 49 s "
                         "instead of 128 s")


@dataclass
class Options:
    """The plans a message may name, each made once (plan.py fills what the case needs)."""
    spec: ModelSpec
    card: Card
    wanted: int | None                          # --context, if given
    vllm: VllmOutcome | None = None             # this model, the 16gb profile
    service: ServiceOutcome | None = None       # this model, the 8gb profile (one GPU only)
    smaller: tuple[str, Plan] | None = None     # the first smaller or FP8 built-in model that fits
    service_option: bool = True                 # vlkit's service is a way to serve it here (not on Kubernetes)


def advise(profile: str, o: Options) -> Plan:
    """The plan `plan_for` returns for ``profile``, with its refusal or auto's reason."""
    if profile == "16gb":
        return _refused(o.vllm.plan, _vllm_refusal(o)) if not o.vllm.plan.fits else o.vllm.plan
    if profile == "8gb":
        return _refused(o.service.plan, _service_refusal(o)) if not o.service.plan.fits else o.service.plan
    return _auto(o)


def advise_evaluated(evaluated: VllmOutcome, o: Options) -> Plan:
    """A hand-written vLLM setting: fits, or why not and what vlkit would start instead."""
    plan, b = evaluated.plan, evaluated.budget
    if plan.fits:
        return plan
    why = b.errors[0] if b.errors else (
        f"it would start with {gib(b.kv_available)} GiB of KV cache, within the margin of "
        f"the {gib(b.kv_needed)} GiB one {plan.context}-token sequence needs")
    own = o.vllm.plan
    step = (f"let vlkit choose (drop {setting('gpu_memory_utilization')}): {' '.join(own.vllm_args)}"
            if own.fits else _next_steps(o, own.context, tried="16gb").removeprefix("Next step: "))
    return _refused(plan, f"{_sentence(why)} The profiling run encodes {b.profiled_images} dummy image(s) of "
                          f"{b.image_tokens} tokens ({gib(b.encoder_peak)} GiB): --mm-processor-kwargs "
                          f"max_pixels is the lever, not --max-model-len. Next step: {step}")


def _refused(plan: Plan, refusal: str) -> Plan:
    return plan.model_copy(update={"refusal": refusal}, deep=True)


def _sentence(text: str) -> str:
    """One sentence: vLLM's messages quoted as it words them, some with their own full stop."""
    return text if text.endswith(".") else text + "."


# ------------------------------------------------------------------------------------ auto
ENGINES = {"16gb": "vLLM", "8gb": "vlkit's service"}


def _auto(o: Options) -> Plan:
    """The profile auto picks, with one line that says why: the profile names read like card sizes,
    so a pick that does not match the card's size (16gb on an 8 GiB card) must explain itself."""
    size = f"{o.card.total / GIB:.0f} GiB"
    card = f"this {size} card" if o.card.count == 1 else f"these {o.card.count} x {size} cards"
    if o.service is None:  # several GPUs: only vLLM splits a model; the service runs on one
        reason = (f"auto: the 16gb profile (vLLM) because vlkit's service runs on one GPU and vLLM splits "
                  f"{_short(o.spec)} over {card}; the profile names are engines, not card sizes")
        return _with_reason(advise("16gb", o), reason)
    p16, p8 = o.vllm.plan, o.service.plan
    if o.card.total < AUTO_VLLM_MIN_TOTAL and p8.fits:
        chosen = p8
        because = (f"it fits {card} and is faster there ({AUTO_SERVICE_MEASURED})" +
                   (f"; {setting('profile', '16gb')} runs vLLM (predicted to fit, context {p16.context})"
                    if p16.fits else "; vLLM does not fit"))
    elif p16.fits:
        chosen = p16
        because = (f"vlkit's service {_service_shortfall(o)}" if not p8.fits and o.card.total < AUTO_VLLM_MIN_TOTAL
                   else f"vLLM fits {_short(o.spec)} on {card} with a context of {p16.context} tokens")
    elif p8.fits:
        chosen = p8
        because = _vllm_shortfall(o, card)
    else:
        refusal = (f"vLLM (16gb): {_vllm_refusal(o)} "
                   f"vlkit's service (8gb) does not fit either: {_service_refusal(o, steps=False).strip()}")
        reason = (f"auto: neither profile fits: {_vllm_shortfall(o, card)}, and vlkit's service "
                  f"{_service_shortfall(o)}; the profile names are engines, not card sizes")
        return _with_reason(_refused(p16, refusal), reason)
    reason = (f"auto: the {chosen.profile} profile ({ENGINES[chosen.profile]}) because {because}; "
              "the profile names are engines, not card sizes")
    return _with_reason(chosen, reason)


def _with_reason(plan: Plan, reason: str) -> Plan:
    return plan.model_copy(update={"auto_reason": reason, "notes": [reason, *plan.notes]}, deep=True)


def _short(spec: ModelSpec) -> str:
    return spec.id.rstrip("/").split("/")[-1]


def _vllm_shortfall(o: Options, card: str) -> str:
    """Why vLLM's best attempt does not fit, in a clause."""
    b, ctx = o.vllm.budget, o.vllm.plan.context
    where = f"{_short(o.spec)} on {card}"
    if b.kv_available <= 0:
        return (f"vLLM's {gib(b.requested)} GiB share of {card} leaves no KV cache after {_short(o.spec)}'s "
                f"{gib(b.weights)} GiB of weights and vLLM's profiling run")
    short_of = (f"the {o.wanted} asked for" if o.wanted
                else f"one image request ({min_useful_context(o.spec, b.knobs.max_pixels)} tokens)")
    return f"vLLM's KV cache for {where} holds {ctx} tokens after its margin, less than {short_of}"


def _service_shortfall(o: Options) -> str:
    """Why the service does not fit, in a clause after "vlkit's service"."""
    sb = o.service.budget
    if _context_is_the_limit(o):
        return f"holds at most {o.service.plan.context} tokens, less than the {o.wanted} asked for"
    return (f"needs {gib(sb.one_sequence_bytes)} GiB for one {sb.knobs.max_model_len}-token sequence, "
            f"more than its {gib(sb.kv.budget)} GiB budget")


# -------------------------------------------------------------------------------- refusals
def _vllm_refusal(o: Options) -> str:
    b, best = o.vllm.budget, o.vllm.plan.context
    why = b.errors[0] if b.errors else (
        f"vLLM would start, but its KV cache holds {best} tokens after the margin, "
        f"{'less than the ' + str(o.wanted) + ' asked for' if o.wanted else 'less than one image needs'}")
    tried = f"Tried: bf16/fp8 KV cache, eager mode, max_pixels down to {PIXEL_STEPS[-1]}."
    return f"{_sentence(why)} {tried} {_next_steps(o, best, tried='16gb')}"


def _service_refusal(o: Options, *, steps: bool = True) -> str:
    sb = o.service.budget
    target, best, kv = sb.knobs.max_model_len, o.service.plan.context, sb.kv
    blocks = blocks_for(target, kv.block_size)
    why = (f"the service needs {gib(sb.one_sequence_bytes)} GiB for one {target}-token sequence "
           f"({sb.knobs.weights} weights {gib(sb.weights)} GiB, prefill reserve {gib(sb.prefill.reserve)} GiB, "
           f"KV cache {gib((blocks + 1) * kv.block_bytes)} GiB: {blocks} blocks of {kv.block_size} tokens + the "
           f"scratch block) but its budget is {gib(kv.budget)} GiB")
    if _context_is_the_limit(o):
        why = f"the largest context that fits is {best} tokens, less than the {o.wanted} asked for"
    return f"{why}. " + (_next_steps(o, best, tried="8gb") if steps else "")


def _context_is_the_limit(o: Options) -> bool:
    """The service fits a useful context, only not the one asked for."""
    sb = o.service.budget
    return bool(o.wanted) and o.service.plan.context >= min_useful_context(o.spec, sb.knobs.max_pixels)


def _next_steps(o: Options, best_context: int, *, tried: str) -> str:
    spec, card, wanted = o.spec, o.card, o.wanted
    steps: list[str] = []
    # A shorter context only where the ladder takes it: one image request at the shown attempt's images.
    shown = (o.vllm if tried == "16gb" else o.service).budget
    if wanted and min_useful_context(spec, shown.knobs.max_pixels) <= best_context < wanted:
        steps.append(f"a shorter context: {setting('context', best_context)}")
    if tried == "16gb" and o.service and o.service.plan.fits:
        steps.append(f"the 8gb profile: {setting('profile', '8gb')} ({o.service.budget.knobs.weights} "
                     f"weights, context {o.service.plan.context})")
    if tried == "8gb" and o.vllm.plan.fits:
        steps.append(f"the 16gb profile: {setting('profile', '16gb')} (context {o.vllm.plan.context})")
    if o.smaller:
        alt_id, alt = o.smaller
        steps.append(f"a smaller or FP8 model: {setting('model', alt_id)} "
                     f"(profile {alt.profile}, context {alt.context})")
    others = card.total - card.free
    if card.measured and others > GIB:
        steps.append(f"free GPU memory: other processes hold {gib(others)} GiB")
    if not steps:
        return (f"Next step: none of vlkit's settings fit {card.total / GIB:.1f} GiB; one image needs a "
                f"context of {min_useful_context(spec, PIXEL_STEPS[0])} tokens. Use a GPU with more memory.")
    return "Next step: " + "; or ".join(steps) + "."
