"""plan_for(): the settings that fit a card, or a refusal that names the next step.

The entry that wires the parts: card.py (the card), vllm_plan.py (the 16gb profile's ladder),
service_plan.py (the 8gb profile's ladder), advice.py (auto's choice, refusals, next steps). Each
ladder runs once per model; every plan a message may name is made here, before any advice.
"""
from __future__ import annotations

from typing import Literal

from scripts.usage import setting

from .advice import Options, advise, advise_evaluated
from .card import card_for
from .models import ModelSpec, resolve_model, variants_to_try
from .options import MIN_CONTEXT
from .schema import Plan
from .service_plan import plan_service
from .vllm_plan import evaluate_vllm, plan_vllm
from .vllm_weights import tensor_parallel_error


def plan_for(*, model: str, profile: Literal["8gb", "16gb", "auto"] = "auto", gpus=None,
             gpu_memory_bytes: int | None = None, gpu_count: int = 1, context: int | None = None,
             gpu_memory_utilization: float | None = None, service_option: bool = True) -> Plan:
    """The settings for `model` on the card(s); see docs/PLANNER.md. ``service_option``: False where
    only vLLM can run (Kubernetes): a refusal's next steps then never name the 8gb profile."""
    if profile not in ("8gb", "16gb", "auto"):
        raise ValueError(f"profile must be 8gb, 16gb or auto, not {profile!r}")
    if context is not None and context < MIN_CONTEXT:
        raise ValueError(f"{setting('context')} must be at least {MIN_CONTEXT} tokens, got {context}")
    spec = resolve_model(model)
    if context is not None and context > spec.text.max_position:
        raise ValueError(f"{setting('context', context)} exceeds {spec.id}'s maximum of {spec.text.max_position}")
    card = card_for(gpus, gpu_memory_bytes, gpu_count)
    why = tensor_parallel_error(spec, card.count)
    if why:
        raise ValueError(f"{setting('gpus', card.count)}: vLLM cannot split {spec.id} over {card.count} GPUs: {why}")
    if card.count > 1 and profile == "8gb":
        raise ValueError(f"{setting('gpus', card.count)}: the 8gb profile's service runs on one GPU; split the "
                         f"model over {card.count} with {setting('profile', '16gb')} (vLLM), or use {setting('gpus', 1)}")
    options = Options(spec, card, context, service_option=service_option)
    if gpu_memory_utilization is not None:
        if profile == "8gb":
            raise ValueError(f"{setting('gpu_memory_utilization')} is a vLLM setting: use it with "
                             f"{setting('profile', '16gb')} or auto")
        evaluated = evaluate_vllm(spec, card, gpu_memory_utilization, context)
        if not evaluated.plan.fits:
            _fill(options, "16gb")
        return advise_evaluated(evaluated, options)
    _fill(options, profile)
    return advise(profile, options)


def _fill(o: Options, profile: str) -> None:
    """Make the plans advice will name: the profile's own (both for auto); when none fits, this model
    under the other profile and the first smaller model that fits. Over several GPUs only vLLM's:
    the service runs on one."""
    single = o.card.count == 1 and o.service_option
    if profile != "8gb":
        o.vllm = plan_vllm(o.spec, o.card, o.wanted)
    if profile != "16gb" and single:
        o.service = plan_service(o.spec, o.card, o.wanted)
    if (o.vllm and o.vllm.plan.fits) or (o.service and o.service.plan.fits):
        return
    o.vllm = o.vllm or plan_vllm(o.spec, o.card, o.wanted)
    if single:
        o.service = o.service or plan_service(o.spec, o.card, o.wanted)
    o.smaller = _smaller_model(o.spec, o)


def _smaller_model(spec: ModelSpec, o: Options) -> tuple[str, Plan] | None:
    ladders = (plan_vllm, plan_service) if o.card.count == 1 and o.service_option else (plan_vllm,)
    for alt_id in variants_to_try(spec):
        alt = resolve_model(alt_id)
        for ladder in ladders:
            plan = ladder(alt, o.card, o.wanted).plan
            if plan.fits:
                return alt_id, plan
    return None
