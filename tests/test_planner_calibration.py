"""The planner against vLLM's own start-up figures (tests/data/vllm_calibration.json, measured on the
GPU machine with the flags the planner chose): the predicted KV cache within 5% of vLLM's "Available
KV cache memory", never optimistic by more than the plan's margin, and, for the cases the constants
were fit to, closer than the planner of that day was. `python -m scripts.planner.validate_on_gpu` produces the next table.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.planner.card import card_for
from scripts.planner.models import resolve_model
from scripts.planner.vllm_memory import predict
from scripts.planner.vllm_plan import knobs_from_args, margin

GIB = 1024**3
DATA = json.loads((Path(__file__).parent / "data" / "vllm_calibration.json").read_text())


def _predicted(case: dict):
    spec = resolve_model(case["model"]).model_copy(update={"vision_quantized": case.get("vision_quantized", False)})
    card = card_for(None, case["card_gib"] * GIB, 1)
    return predict(spec, knobs_from_args(case["args"], spec), total=card.total, free=card.free)


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda c: c["name"])
def test_kv_cache_within_5_percent_and_the_margin(case):
    b = _predicted(case)
    predicted = b.kv_available / GIB
    for measured in case["available_kv_gib"]:         # every run of the case
        assert abs(predicted - measured) <= 0.05 * abs(measured), (predicted, measured)
        assert predicted - measured < margin(b) / GIB  # optimistic by less than the margin kept
    if "kv_tokens" in case:
        assert b.kv_tokens == pytest.approx(sum(case["kv_tokens"]) / len(case["kv_tokens"]), rel=0.05)


@pytest.mark.parametrize("case", [c for c in DATA["cases"] if "planned_kv_gib" in c], ids=lambda c: c["name"])
def test_every_case_fit_to_moved_towards_vllm(case):
    measured = sum(case["available_kv_gib"]) / len(case["available_kv_gib"])
    assert abs(_predicted(case).kv_available / GIB - measured) < abs(case["planned_kv_gib"] - measured)


def test_the_flags_read_back_are_the_flags_written():
    """knobs_from_args inverts vllm_args (what the calibration predicts is what was run)."""
    from scripts.planner import plan_for
    from scripts.planner.vllm_plan import vllm_args

    plan = plan_for(model="Qwen/Qwen3-VL-4B-Instruct-FP8", profile="16gb", gpu_memory_bytes=8 * GIB, gpu_count=1)
    spec = resolve_model(plan.model)
    assert vllm_args(knobs_from_args(plan.vllm_args, spec)) == plan.vllm_args
