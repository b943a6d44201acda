"""The 8gb planner mirrors how the service sizes itself (service/memory.py, service/engine.py).

service.memory imports torch, so the planner keeps copies of its constants and its slot rule: these
tests hold the copies to the service's own code, the estimate to the GPU measurements, and every
8gb plan to the service's start-up rule (at least one KV slot inside the budget).
"""
from __future__ import annotations

import itertools
import os

import pytest

from scripts.planner import plan_for
from scripts.planner.models import BUILTIN_IDS, resolve_model
from scripts.planner.service_memory import (
    GIB, HEADROOM_BYTES, MIB, SLOT_EXTRA_TOKENS, ServiceKnobs, images_that_fit, predict_service, slots_that_fit,
)
from service.settings import ServiceSettings

TWO_B = "Qwen/Qwen3-VL-2B-Instruct"
FULL_PX = 1_003_520


def _knobs_of(plan) -> tuple[ServiceKnobs, int]:
    env = plan.service_env
    knobs = ServiceKnobs(env["VLKIT_QUANTIZATION"], int(env["VLKIT_MAX_PIXELS"]),
                         int(env["VLKIT_MAX_IMAGES_PER_REQUEST"]), int(env["VLKIT_MAX_BATCH_SIZE"]),
                         int(env["VLKIT_MAX_MODEL_LEN"]))
    return knobs, int(float(env["VLKIT_MEMORY_BUDGET_GIB"]) * GIB)   # as the service reads the budget


# ------------------------------------------------------------------ the copies match the service
def test_constants_mirror_the_service():
    memory = pytest.importorskip("service.memory")
    assert HEADROOM_BYTES == memory.HEADROOM_BYTES
    assert memory.plan_slots.__kwdefaults__["headroom_bytes"] == HEADROOM_BYTES


@pytest.mark.parametrize("budget_gib, resident_gib, reserve_gib, slot_mib, max_slots", [
    (6.0, 4.74, 1.03, 448, 8), (6.0, 4.74, 0.54, 224, 8), (7.0, 4.74, 1.03, 448, 8), (80.0, 4.0, 1.0, 448, 8),
    (5.0, 4.9, 0.2, 448, 8), (11.0, 4.0, 1.0, 576, 3)])
def test_the_slot_rule_is_the_services(budget_gib, resident_gib, reserve_gib, slot_mib, max_slots):
    memory = pytest.importorskip("service.memory")
    args = dict(budget_bytes=int(budget_gib * GIB), resident_bytes=int(resident_gib * GIB),
                prefill_peak_bytes=int(reserve_gib * GIB), slot_bytes=slot_mib * MIB, max_slots=max_slots)
    assert slots_that_fit(budget=args["budget_bytes"], resident=args["resident_bytes"],
                          prefill_reserve=args["prefill_peak_bytes"], slot_bytes=args["slot_bytes"],
                          max_slots=max_slots) == memory.plan_slots(**args).slots


def test_kv_bytes_per_token_is_the_slot_caches(tiny_model_dir):
    """The planner's per-token KV bytes equal the service's SlotKVCache figure, on a real config."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig

    from service.decode.cache import SlotKVCache
    spec = resolve_model(str(tiny_model_dir))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert spec.kv_bytes_per_token(2) == SlotKVCache.bytes_per_token(config, torch.bfloat16)
    knobs = ServiceKnobs("none", FULL_PX, 0, 1, 512)
    assert predict_service(spec, knobs, 80 * GIB).slot_bytes == spec.kv_bytes_per_token(2) * (512 + SLOT_EXTRA_TOKENS)


def test_each_image_adds_its_tokens_and_two_wrappers(tiny_model_dir):
    """The image rule counts <|vision_start|> and <|vision_end|> around each image, as the real
    processor builds the prompt."""
    from PIL import Image

    from scripts.planner.service_memory import IMAGE_WRAPPER_TOKENS
    from service.loading import load_processor
    processor = load_processor(tiny_model_dir)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    lengths = []
    for n in (0, 1, 2):
        content = [{"type": "image"}] * n + [{"type": "text", "text": "x"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        ids = processor(text=[text], images=[Image.new("RGB", (64, 64))] * n or None, return_tensors="pt")["input_ids"][0]
        lengths.append((len(ids), int((ids == pad).sum())))
    (base, _), (one, pads1), (two, pads2) = lengths
    assert one - base - pads1 == IMAGE_WRAPPER_TOKENS and two - base - pads2 == 2 * IMAGE_WRAPPER_TOKENS


# --------------------------------------------------------------- the estimate vs the measurements
@pytest.mark.parametrize("images, context, measured_gib", [(1, 2048, 0.54), (4, 4096, 1.03)])
def test_prefill_reserve_is_calibrated_to_the_h100_measurements(images, context, measured_gib):
    """Qwen3-VL-2B bf16 on an H100: the service measured these prefill peaks for its largest request."""
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("none", FULL_PX, images, 8, context), 80 * GIB)
    assert b.images == images
    assert measured_gib <= b.prefill_reserve / GIB <= measured_gib + 0.03


def test_resident_matches_the_measured_figure():
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("none", FULL_PX, 4, 8, 4096), 80 * GIB)
    assert 4.73 <= b.resident / GIB <= 4.77       # measured 4.74-4.76 GiB (NVML) after load


@pytest.mark.parametrize("context, expected", [(960, 0), (1024, 1), (2048, 2), (3000, 3), (4096, 4), (8192, 4)])
def test_as_many_images_as_fit_the_context(context, expected):
    assert images_that_fit(resolve_model(TWO_B), FULL_PX, 4, context) == expected


# ------------------------------------------------------------------------- the service's defaults
def test_the_service_defaults_start_the_2b_model_with_two_slots():
    """`python -m service --model Qwen/Qwen3-VL-2B-Instruct` with every other setting at its default,
    on CUDA: the service refuses to start without one slot; two let it batch."""
    d = ServiceSettings.model_fields
    knobs = ServiceKnobs(d["quantization"].default, d["max_pixels"].default, d["max_images_per_request"].default,
                         d["max_batch_size"].default, d["max_model_len"].default)
    b = predict_service(resolve_model(d["model"].default), knobs, int(d["memory_budget_gib"].default * GIB))
    assert b.slots >= 2 and b.total <= b.budget
    # The images the defaults allow are what fits the default context (no silent lower limit).
    assert b.images == knobs.max_images


def test_the_old_defaults_would_refuse_to_start():
    """The control: 4096 tokens and 4 images at 6.0 GiB leave no room for one slot."""
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("none", FULL_PX, 4, 8, 4096), int(6.0 * GIB))
    assert b.slots == 0


# --------------------------------------------------------------------------- every 8gb plan starts
@pytest.mark.parametrize("model, gb", list(itertools.product(BUILTIN_IDS, (6, 8, 12, 16))))
def test_every_8gb_plan_starts_by_the_services_rule(model, gb):
    plan = plan_for(model=model, profile="8gb", gpu_memory_bytes=gb * GIB)
    if not plan.fits:
        assert plan.refusal and not plan.service_env
        return
    knobs, budget = _knobs_of(plan)
    b = predict_service(resolve_model(model), knobs, budget)
    assert b.slots >= 1 and b.total <= budget <= gb * GIB
    assert b.slots >= knobs.max_batch_size                # every planned batch row has its slot
    assert knobs.max_batch_size <= 8
    assert b.images == knobs.max_images <= 4              # the image limit is what fits the context
    assert plan.required_free_bytes <= gb * GIB - 800 * MIB   # what the desktop leaves
    assert plan.context in (4096, 2048)
    assert knobs.max_batch_size >= 2 or plan.context == 2048  # never a long context for one request


def test_2b_on_an_8gb_card_batches_at_least_two():
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB)
    assert plan.fits and plan.context == 4096
    assert int(plan.service_env["VLKIT_MAX_BATCH_SIZE"]) >= 2
    assert plan.service_env["VLKIT_QUANTIZATION"] == "none"


def test_a_wanted_context_is_honoured_when_one_slot_fits_else_refused_with_the_next_step():
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB, context=5120)
    assert plan.fits and plan.context == 5120
    knobs, budget = _knobs_of(plan)
    assert predict_service(resolve_model(TWO_B), knobs, budget).slots >= 1
    too_long = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB, context=32768)
    assert not too_long.fits and not too_long.service_env
    assert f"--context {too_long.context}" in too_long.refusal
    shorter = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB, context=too_long.context)
    assert shorter.fits                                    # the named step works


def test_a_planned_env_is_what_the_service_reads(monkeypatch):
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB)
    for key in list(os.environ):
        if key.startswith("VLKIT_"):
            monkeypatch.delenv(key)
    for key, value in plan.service_env.items():
        monkeypatch.setenv(key, value)
    s = ServiceSettings()
    knobs, budget = _knobs_of(plan)
    assert (s.max_model_len, s.max_batch_size, s.max_images_per_request) == (
        knobs.max_model_len, knobs.max_batch_size, knobs.max_images)
    assert int(s.memory_budget_gib * GIB) == budget
