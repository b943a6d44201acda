"""The 8gb planner predicts how the service sizes itself (service/sizing.py's rules, the engine's measurements).

The rules are the service's own (imported, not copied); these tests hold the planner's estimates of
what the service measures to the real parts (the paged cache, the processor) and to the GPU
measurements, and every 8gb plan to the service's start-up rule (KV blocks for at least one
max_model_len sequence inside the budget).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import replace

import pytest

from scripts.planner import plan_for
from scripts.planner.models import BUILTIN_IDS, resolve_model
from scripts.planner.service_memory import (
    IMAGE_WRAPPER_TOKENS, ServiceKnobs, image_held_bytes, images_that_fit, predict_service,
)
from scripts.planner.targets import PIXEL_STEPS, min_useful_context
from service.settings import ServiceSettings
from service.sizing import BLOCK_SIZE, GIB, MIB, blocks_for

TWO_B = "Qwen/Qwen3-VL-2B-Instruct"
FULL_PX = 1_003_520


def _weights(quantization: str, model: str) -> str:
    """The weights format the service holds a checkpoint in under VLKIT_QUANTIZATION."""
    if quantization == "none":
        return "fp8" if resolve_model(model).fp8_checkpoint else "bf16"
    return quantization


def _knobs_of(plan) -> tuple[ServiceKnobs, int]:
    env = plan.service_env
    knobs = ServiceKnobs(_weights(env["VLKIT_QUANTIZATION"], plan.model), int(env["VLKIT_MAX_PIXELS"]),
                         int(env["VLKIT_MAX_IMAGES_PER_REQUEST"]), int(env["VLKIT_MAX_BATCH_SIZE"]),
                         int(env["VLKIT_MAX_MODEL_LEN"]), int(env["VLKIT_MAX_NUM_BATCHED_TOKENS"]))
    return knobs, int(float(env["VLKIT_MEMORY_BUDGET_GIB"]) * GIB)   # as the service reads the budget


# ------------------------------------------------------------------ the estimates vs the real parts
def test_kv_bytes_per_token_is_the_paged_caches(tiny_model_dir):
    """The planner's per-token KV bytes equal the service's PagedKVCache figure, on a real config."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig

    from service.decode.cache import PagedKVCache
    spec = resolve_model(str(tiny_model_dir))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert spec.kv_bytes_per_token(2) == PagedKVCache.bytes_per_token(config, torch.bfloat16)
    knobs = ServiceKnobs("bf16", FULL_PX, 0, 1, 512)
    b = predict_service(spec, knobs, 80 * GIB)
    assert b.kv.block_bytes == PagedKVCache.bytes_per_token(config, torch.bfloat16) * BLOCK_SIZE
    assert (b.kv.blocks, b.sequences, b.kv.tokens) == (512 // BLOCK_SIZE, 1, 512)   # capped at max_batch_size sequences
    # The pool the service would allocate for these blocks: (blocks + 1) x block, as the planner counts it.
    cache = PagedKVCache(config, 1, 512, b.kv.blocks, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes == b.kv.kv_bytes


def test_each_image_adds_its_tokens_and_two_wrappers(tiny_model_dir):
    """The image rule counts <|vision_start|> and <|vision_end|> around each image, as the real
    processor builds the prompt."""
    from PIL import Image

    from service.engine.loading import load_processor
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
@pytest.mark.parametrize("images, context, measured_gib", [(1, 2048, 0.24), (2, 2048, 0.26), (4, 4096, 0.30)])
def test_prefill_reserve_brackets_the_h100_measurements(images, context, measured_gib):
    """Qwen3-VL-2B bf16 (random weights) on an H100: the engine's start-up log measured these prefill
    reserves for its largest request (`max_images_per_request` images of the default max_pixels,
    text to max_model_len - 1), in passes of 1024 tokens, one image at a time through the vision tower.
    The prediction is at or above each, by at most 0.05 GiB."""
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("bf16", FULL_PX, images, 8, context, 1024), 80 * GIB)
    assert b.prefill.vision_batch == min(images, 1)
    assert b.prefill.images == images
    assert b.prefill.vision_peak > b.prefill.decoder_peak    # these requests are bound by the vision phase
    assert measured_gib <= b.prefill.reserve / GIB <= measured_gib + 0.05


def test_prefill_reserve_covers_four_images_in_one_vision_forward():
    """The 16 GiB card's 2B plan (4 images, 4096-token passes: the vision tower takes the four at once):
    the engine's start-up log on an H200 measured a 0.94 GiB reserve. The prediction is at or above it."""
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("bf16", FULL_PX, 4, 32, 4096, 4096), 80 * GIB)
    assert b.prefill.vision_batch == 4
    assert 0.94 <= b.prefill.reserve / GIB <= 0.94 + 0.05


# The same measurement (the engine's `prefill_peak`: max of allocated, reserved and NVML growth, expandable
# segments) of the service's prefill code, random-weight shapes on an H100, images of 961 tokens, passes of
# 1024 tokens and one image at a time: (shape, images, max_model_len, measured GiB). The 2B rows reproduce the engine's log above.
PROBE = [
    ("2B", 1, 2048, 0.236), ("2B", 2, 2048, 0.256), ("2B", 4, 4096, 0.297),
    ("2B", 0, 2048, 0.121), ("2B", 0, 4096, 0.160), ("2B", 0, 16384, 0.356),
    ("4B", 1, 2048, 0.219), ("4B", 2, 2048, 0.258), ("4B", 4, 4096, 0.395),
    ("4B", 0, 2048, 0.219), ("4B", 0, 4096, 0.277), ("4B", 0, 16384, 0.629),
    ("8B", 1, 2048, 0.297), ("8B", 2, 2048, 0.316), ("8B", 4, 4096, 0.434),
    ("8B", 0, 2048, 0.238), ("8B", 0, 4096, 0.297), ("8B", 0, 16384, 0.627),
]


@pytest.mark.parametrize("size, images, context, measured_gib", PROBE)
def test_prefill_reserve_extends_to_the_other_shapes(size, images, context, measured_gib):
    """The shape-based terms cover the 4B and 8B shapes and long text-only prefixes too (the decoder
    constants are fit to these): never under the measurement, at most 0.1 GiB over."""
    b = predict_service(resolve_model(f"Qwen/Qwen3-VL-{size}-Instruct"),
                        ServiceKnobs("bf16", FULL_PX, images, 8, context, 1024), 80 * GIB)
    assert b.prefill.images == images
    assert measured_gib <= b.prefill.reserve / GIB <= measured_gib + 0.10


@pytest.mark.parametrize("size, measured_gib", [("2B", 0.0257), ("4B", 0.0293), ("8B", 0.0403)])
def test_what_an_image_holds_is_its_pixels_and_vision_output(size, measured_gib):
    """Measured: torch's allocated growth per image after the vision tower (961-token images)."""
    assert image_held_bytes(resolve_model(f"Qwen/Qwen3-VL-{size}-Instruct"), 961) / GIB == pytest.approx(
        measured_gib, abs=0.0005)


def test_the_reserve_follows_the_prefills_structure():
    """One image at a time (1024-token passes): more images add only what they hold; the decoder's pass
    attends to the whole context, so a longer context grows only the decoder phase; nf4 adds a
    dequantized weight."""
    spec = resolve_model(TWO_B)
    one, two = (predict_service(spec, ServiceKnobs("bf16", FULL_PX, n, 8, 8192, 1024), 80 * GIB).prefill
                for n in (1, 2))
    assert two.reserve - one.reserve == image_held_bytes(spec, one.image_tokens)
    assert one.vision_peak == two.vision_peak
    short, long = (predict_service(spec, ServiceKnobs("bf16", FULL_PX, 0, 8, n, 1024), 80 * GIB).prefill
                   for n in (4096, 32768))
    assert short.vision_peak == long.vision_peak == 0 and long.decoder_peak > short.decoder_peak
    nf4 = predict_service(spec, ServiceKnobs("nf4", FULL_PX, 0, 8, 4096, 1024), 80 * GIB).prefill
    assert nf4.decoder_peak - short.decoder_peak == 2 * spec.text.hidden * spec.text.intermediate


@pytest.mark.parametrize("tokens, batch", [(1024, 1), (2048, 2), (4096, 4), (8192, 4)])
def test_larger_passes_put_whole_images_through_the_vision_tower_together(tokens, batch):
    """A pass of max_num_batched_tokens holds that many tokens of images (981 each here) in one forward
    of the vision tower, at most the largest request's 4: its peak grows with them, what they hold
    does not; the decoder's pass grows with its tokens."""
    spec = resolve_model(TWO_B)
    one = predict_service(spec, ServiceKnobs("bf16", FULL_PX, 4, 8, 4096, 1024), 80 * GIB).prefill
    more = predict_service(spec, ServiceKnobs("bf16", FULL_PX, 4, 8, 4096, tokens), 80 * GIB).prefill
    assert more.vision_batch == batch
    assert more.vision_peak == pytest.approx(batch * one.vision_peak, rel=1e-6)
    assert more.images_held == one.images_held
    assert (more.decoder_peak > one.decoder_peak) == (tokens > 1024)


def test_resident_matches_the_measured_figure():
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("bf16", FULL_PX, 4, 8, 4096), 80 * GIB)
    assert 4.73 <= b.kv.resident / GIB <= 4.77       # measured 4.74-4.76 GiB (NVML) after load


@pytest.mark.parametrize("context, expected", [(960, 0), (1024, 1), (2048, 2), (3000, 3), (4096, 4), (8192, 4)])
def test_as_many_images_as_fit_the_context(context, expected):
    assert images_that_fit(resolve_model(TWO_B), FULL_PX, 4, context) == expected


# ------------------------------------------------------------------------- the service's defaults
def test_the_service_defaults_start_the_2b_model_with_two_full_sequences():
    """`python -m service --model Qwen/Qwen3-VL-2B-Instruct` with every other setting at its default,
    on CUDA: the service refuses to start without KV blocks for one max_model_len sequence; two let it
    batch full-length requests (shorter ones share the blocks, up to max_batch_size)."""
    d = ServiceSettings.model_fields
    knobs = ServiceKnobs(_weights(d["quantization"].default, d["model"].default), d["max_pixels"].default,
                         d["max_images_per_request"].default, d["max_batch_size"].default, d["max_model_len"].default,
                         d["max_num_batched_tokens"].default)
    b = predict_service(resolve_model(d["model"].default), knobs, int(d["memory_budget_gib"].default * GIB))
    assert b.sequences >= 2 and b.kv.used <= b.kv.budget
    # The images the defaults allow are what fits the default context (no silent lower limit).
    assert b.prefill.images == knobs.max_images


def test_the_old_defaults_start_now_and_a_longer_context_is_refused():
    """4096 tokens and 4 images at 6.0 GiB left no room for one sequence while the prefill went through
    transformers (1.03 GiB measured); the own prefill's reserve (0.30 measured) leaves blocks for one.
    The control: 8192 tokens (129 blocks a sequence) do not fit."""
    spec = resolve_model(TWO_B)
    b = predict_service(spec, ServiceKnobs("bf16", FULL_PX, 4, 8, 4096, 1024), int(6.0 * GIB))
    assert b.sequences == 1 and b.kv.used <= b.kv.budget
    b = predict_service(spec, ServiceKnobs("bf16", FULL_PX, 4, 8, 8192, 1024), int(6.0 * GIB))
    assert b.sequences == 0 and not b.fits
    assert b.one_sequence_bytes > b.kv.budget


# --------------------------------------------------------------------------- every 8gb plan starts
@pytest.mark.parametrize("model, gb", list(itertools.product(BUILTIN_IDS, (6, 8, 12, 16))))
def test_every_8gb_plan_starts_by_the_services_rule(model, gb):
    plan = plan_for(model=model, profile="8gb", gpu_memory_bytes=gb * GIB)
    if not plan.fits:
        assert plan.refusal and not plan.service_env
        return
    knobs, budget = _knobs_of(plan)
    b = predict_service(resolve_model(model), knobs, budget)
    assert b.sequences >= 1 and b.kv.used <= budget <= gb * GIB    # the service starts: one full sequence fits
    assert plan.concurrent_sequences == b.sequences and plan.kv_cache_tokens == b.kv.tokens == b.kv.blocks * BLOCK_SIZE
    # VLKIT_MAX_BATCH_SIZE: the typical image requests the blocks hold, 8 to 32 (the largest decode graph)
    typical = min_useful_context(resolve_model(model), knobs.max_pixels)
    assert knobs.max_batch_size == max(8, min(32, b.kv.tokens // typical))
    assert b.prefill.images == knobs.max_images <= 4      # the image limit is what fits the context
    assert plan.required_free_bytes <= gb * GIB - 800 * MIB   # what the desktop leaves
    assert plan.context in (4096, 2048)
    assert b.sequences >= 2 or plan.context == 2048       # never a long context for one request


@pytest.mark.parametrize("gb, tokens", [(8, 1024), (16, 4096)])
def test_prefill_passes_grow_only_while_the_batch_keeps_its_requests(gb, tokens):
    """2B: on a 16 GiB card passes of 4096 tokens still leave KV blocks for the 32-request batch; on an
    8 GiB card 2048 would take blocks from the 8 typical requests it holds, so it stays at 1024."""
    from scripts.planner.service_plan import _requests_held

    spec = resolve_model(TWO_B)
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=gb * GIB)
    knobs, budget = _knobs_of(plan)
    assert knobs.batched_tokens == tokens
    chosen = predict_service(spec, knobs, budget)
    floor = predict_service(spec, replace(knobs, batched_tokens=1024), budget)
    assert _requests_held(spec, chosen) == _requests_held(spec, floor)
    if tokens < 4096:  # the next step would lose a request
        larger = predict_service(spec, replace(knobs, batched_tokens=tokens * 2), budget)
        assert _requests_held(spec, larger) < _requests_held(spec, floor)


def test_2b_on_an_8gb_card_batches_at_least_two():
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB)
    assert plan.fits and plan.context == 4096
    assert plan.concurrent_sequences >= 2                 # two full 4096-token sequences
    assert int(plan.service_env["VLKIT_MAX_BATCH_SIZE"]) == 8
    assert plan.service_env["VLKIT_QUANTIZATION"] == "none"


def test_a_wanted_context_is_honoured_when_one_sequence_fits_else_refused_with_the_next_step():
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=8 * GIB, context=5120)
    assert plan.fits and plan.context == 5120
    knobs, budget = _knobs_of(plan)
    assert predict_service(resolve_model(TWO_B), knobs, budget).sequences >= 1
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
    assert (s.max_model_len, s.max_batch_size, s.max_images_per_request, s.max_num_batched_tokens) == (
        knobs.max_model_len, knobs.max_batch_size, knobs.max_images, knobs.batched_tokens)
    assert int(s.memory_budget_gib * GIB) == budget


def test_a_refusal_names_what_one_sequence_needs_by_the_block_rule():
    """Nothing fits 4 GiB: the refusal's figure is exactly the service's threshold for one 2048-token
    sequence with the cheapest knobs (nf4, the smallest images): its blocks + the scratch block."""
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=4 * GIB)
    assert not plan.fits and not plan.service_env
    spec, px = resolve_model(TWO_B), PIXEL_STEPS[-1]
    knobs = ServiceKnobs("nf4", px, images_that_fit(spec, px, 4, 2048), 8, 2048, 1024)
    b = predict_service(spec, knobs, 0)
    need = b.kv.resident + b.prefill.reserve + b.kv.headroom + (blocks_for(2048) + 1) * b.kv.block_bytes
    assert predict_service(spec, knobs, need).sequences == 1
    assert predict_service(spec, knobs, need - 1).sequences == 0
    assert f"needs {need / GIB:.2f} GiB for one 2048-token sequence" in plan.refusal
    assert f"{blocks_for(2048)} blocks of {BLOCK_SIZE} tokens + the scratch block" in plan.refusal
