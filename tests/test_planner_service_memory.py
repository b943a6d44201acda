"""The 8gb planner mirrors how the service sizes itself (service/memory.py, service/engine.py).

service.memory imports torch, so the planner keeps copies of its constants and its KV block rule:
these tests hold the copies to the service's own code, the estimate to the GPU measurements, and
every 8gb plan to the service's start-up rule (KV blocks for at least one max_model_len sequence
inside the budget).
"""
from __future__ import annotations

import itertools
import os

import pytest

from scripts.planner import plan_for
from scripts.planner.models import BUILTIN_IDS, resolve_model
from scripts.planner.service_memory import (
    BLOCK_SIZE, GIB, HEADROOM_BYTES, MIB, PREFILL_CHUNK, ServiceKnobs, blocks_for, image_held_bytes, images_that_fit,
    kv_blocks_that_fit, predict_service,
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
    memory = pytest.importorskip("service.sizing")
    cache = pytest.importorskip("service.decode.cache")
    assert HEADROOM_BYTES == memory.HEADROOM_BYTES
    assert memory.plan_kv_blocks.__kwdefaults__["headroom_bytes"] == HEADROOM_BYTES
    prefill = pytest.importorskip("service.decode.qwen3_prefill")
    assert PREFILL_CHUNK == prefill.PREFILL_CHUNK
    assert BLOCK_SIZE == cache.BLOCK_SIZE
    assert kv_blocks_that_fit.__kwdefaults__["block_size"] == cache.BLOCK_SIZE
    for tokens in (1, 63, 64, 65, 2048, 4095, 4096, 4097):
        assert blocks_for(tokens) == cache.blocks_for(tokens)


BLOCK_2B = 64 * 114_688   # 7 MiB: a block of Qwen3-VL-2B's bf16 K/V


@pytest.mark.parametrize("budget_gib, resident_gib, reserve_gib, block_bytes, max_len, max_sequences", [
    (6.0, 4.74, 1.03, BLOCK_2B, 4096, 8), (6.0, 4.74, 0.54, BLOCK_2B, 2048, 8), (7.0, 4.74, 0.83, BLOCK_2B, 4096, 8),
    (80.0, 4.0, 1.0, BLOCK_2B, 4096, 8), (5.0, 4.9, 0.2, BLOCK_2B, 4096, 8), (11.0, 4.0, 1.0, 9 * MIB, 5000, 3),
    (5.25, 4.0, 0.5, BLOCK_2B, 2048, 1), (4.0, 4.0, 0.5, BLOCK_2B, 2048, 8), (7.0, 2.01, 0.83, BLOCK_2B, 4000, 8),
    (6.0, 4.74, 0.41, 2 * BLOCK_2B, 2048, 2)])
def test_the_block_rule_is_the_services(budget_gib, resident_gib, reserve_gib, block_bytes, max_len, max_sequences):
    memory = pytest.importorskip("service.sizing")
    args = dict(budget_bytes=int(budget_gib * GIB), resident_bytes=int(resident_gib * GIB),
                prefill_peak_bytes=int(reserve_gib * GIB), block_bytes=block_bytes, block_size=BLOCK_SIZE,
                max_len=max_len, max_sequences=max_sequences)
    plan = memory.plan_kv_blocks(**args)
    blocks = kv_blocks_that_fit(budget=args["budget_bytes"], resident=args["resident_bytes"],
                                prefill_reserve=args["prefill_peak_bytes"], block_bytes=block_bytes, max_len=max_len,
                                max_sequences=max_sequences)
    assert blocks == plan.blocks


@pytest.mark.parametrize("spare", [0, -1, BLOCK_2B - 1, BLOCK_2B])
def test_one_full_sequence_is_the_start_up_threshold(spare):
    """Service and planner agree at the edge: ceil(max_len / 64) blocks + the scratch block."""
    memory = pytest.importorskip("service.sizing")
    resident, reserve = 2 * GIB, GIB // 2
    budget = resident + reserve + HEADROOM_BYTES + (64 + 1) * BLOCK_2B + spare
    plan = memory.plan_kv_blocks(budget_bytes=budget, resident_bytes=resident, prefill_peak_bytes=reserve,
                                 block_bytes=BLOCK_2B, block_size=BLOCK_SIZE, max_len=4096, max_sequences=8)
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("none", FULL_PX, 0, 8, 4096), budget)
    b.weights, b.cuda_context = resident, 0                            # the service's measurements
    b.prefill_fixed, b.images_held, b.vision_peak, b.decoder_peak = 0, 0, 0, reserve
    b.blocks = kv_blocks_that_fit(budget=budget, resident=b.resident, prefill_reserve=b.prefill_reserve,
                                  block_bytes=b.block_bytes, max_len=4096, max_sequences=8)
    assert b.block_bytes == BLOCK_2B
    assert (b.blocks, b.sequences, b.tokens, b.kv) == (plan.blocks, plan.full_sequences, plan.tokens, plan.kv_bytes)
    assert b.fits == (plan.full_sequences >= 1) == (spare >= 0)
    if spare >= 0:
        assert b.total <= budget


def test_kv_bytes_per_token_is_the_paged_caches(tiny_model_dir):
    """The planner's per-token KV bytes equal the service's PagedKVCache figure, on a real config."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig

    from service.decode.cache import PagedKVCache
    spec = resolve_model(str(tiny_model_dir))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert spec.kv_bytes_per_token(2) == PagedKVCache.bytes_per_token(config, torch.bfloat16)
    knobs = ServiceKnobs("none", FULL_PX, 0, 1, 512)
    b = predict_service(spec, knobs, 80 * GIB)
    assert b.block_bytes == PagedKVCache.bytes_per_token(config, torch.bfloat16) * BLOCK_SIZE
    assert (b.blocks, b.sequences, b.tokens) == (512 // BLOCK_SIZE, 1, 512)   # capped at max_batch_size sequences
    # The pool the service would allocate for these blocks: (blocks + 1) x block, as the planner counts it.
    cache = PagedKVCache(config, 1, 512, b.blocks, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes == b.kv


def test_each_image_adds_its_tokens_and_two_wrappers(tiny_model_dir):
    """The image rule counts <|vision_start|> and <|vision_end|> around each image, as the real
    processor builds the prompt."""
    from PIL import Image

    from scripts.planner.service_memory import IMAGE_WRAPPER_TOKENS
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
    text to max_model_len - 1). The prediction is at or above each, by at most 0.05 GiB."""
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("none", FULL_PX, images, 8, context), 80 * GIB)
    assert b.images == images
    assert b.vision_peak > b.decoder_peak                 # these requests are bound by the vision phase
    assert measured_gib <= b.prefill_reserve / GIB <= measured_gib + 0.05


# The same measurement (`_prefill_peak`'s max of allocated, reserved and NVML growth, expandable
# segments) of the service's prefill code, random-weight shapes on an H100, images of 961 tokens:
# (shape, images, max_model_len, measured GiB). The 2B rows reproduce the engine's log above.
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
                        ServiceKnobs("none", FULL_PX, images, 8, context), 80 * GIB)
    assert b.images == images
    assert measured_gib <= b.prefill_reserve / GIB <= measured_gib + 0.10


@pytest.mark.parametrize("size, measured_gib", [("2B", 0.0257), ("4B", 0.0293), ("8B", 0.0403)])
def test_what_an_image_holds_is_its_pixels_and_vision_output(size, measured_gib):
    """Measured: torch's allocated growth per image after the vision tower (961-token images)."""
    assert image_held_bytes(resolve_model(f"Qwen/Qwen3-VL-{size}-Instruct"), 961) / GIB == pytest.approx(
        measured_gib, abs=0.0005)


def test_the_reserve_follows_the_prefills_structure():
    """One image at a time: more images add only what they hold; the decoder's chunk attends to the
    whole context, so a longer context grows only the decoder phase; nf4 adds a dequantized weight."""
    spec = resolve_model(TWO_B)
    one, two = (predict_service(spec, ServiceKnobs("none", FULL_PX, n, 8, 8192), 80 * GIB) for n in (1, 2))
    assert two.prefill_reserve - one.prefill_reserve == image_held_bytes(spec, one.image_tokens)
    assert one.vision_peak == two.vision_peak
    short, long = (predict_service(spec, ServiceKnobs("none", FULL_PX, 0, 8, n), 80 * GIB) for n in (4096, 32768))
    assert short.vision_peak == long.vision_peak == 0 and long.decoder_peak > short.decoder_peak
    nf4 = predict_service(spec, ServiceKnobs("nf4", FULL_PX, 0, 8, 4096), 80 * GIB)
    assert nf4.decoder_peak - short.decoder_peak == 2 * spec.text.hidden * spec.text.intermediate


def test_resident_matches_the_measured_figure():
    b = predict_service(resolve_model(TWO_B), ServiceKnobs("none", FULL_PX, 4, 8, 4096), 80 * GIB)
    assert 4.73 <= b.resident / GIB <= 4.77       # measured 4.74-4.76 GiB (NVML) after load


@pytest.mark.parametrize("context, expected", [(960, 0), (1024, 1), (2048, 2), (3000, 3), (4096, 4), (8192, 4)])
def test_as_many_images_as_fit_the_context(context, expected):
    assert images_that_fit(resolve_model(TWO_B), FULL_PX, 4, context) == expected


# ------------------------------------------------------------------------- the service's defaults
def test_the_service_defaults_start_the_2b_model_with_two_full_sequences():
    """`python -m service --model Qwen/Qwen3-VL-2B-Instruct` with every other setting at its default,
    on CUDA: the service refuses to start without KV blocks for one max_model_len sequence; two let it
    batch full-length requests (shorter ones share the blocks, up to max_batch_size)."""
    d = ServiceSettings.model_fields
    knobs = ServiceKnobs(d["quantization"].default, d["max_pixels"].default, d["max_images_per_request"].default,
                         d["max_batch_size"].default, d["max_model_len"].default)
    b = predict_service(resolve_model(d["model"].default), knobs, int(d["memory_budget_gib"].default * GIB))
    assert b.sequences >= 2 and b.total <= b.budget
    # The images the defaults allow are what fits the default context (no silent lower limit).
    assert b.images == knobs.max_images


def test_the_old_defaults_start_now_and_a_longer_context_is_refused():
    """4096 tokens and 4 images at 6.0 GiB left no room for one sequence while the prefill went through
    transformers (1.03 GiB measured); the own prefill's reserve (0.30 measured) leaves blocks for one.
    The control: 8192 tokens (129 blocks a sequence) do not fit."""
    spec = resolve_model(TWO_B)
    b = predict_service(spec, ServiceKnobs("none", FULL_PX, 4, 8, 4096), int(6.0 * GIB))
    assert b.sequences == 1 and b.total <= b.budget
    b = predict_service(spec, ServiceKnobs("none", FULL_PX, 4, 8, 8192), int(6.0 * GIB))
    assert b.sequences == 0 and not b.fits
    assert b.free_for_kv < (blocks_for(8192) + 1) * b.block_bytes


# --------------------------------------------------------------------------- every 8gb plan starts
@pytest.mark.parametrize("model, gb", list(itertools.product(BUILTIN_IDS, (6, 8, 12, 16))))
def test_every_8gb_plan_starts_by_the_services_rule(model, gb):
    plan = plan_for(model=model, profile="8gb", gpu_memory_bytes=gb * GIB)
    if not plan.fits:
        assert plan.refusal and not plan.service_env
        return
    knobs, budget = _knobs_of(plan)
    b = predict_service(resolve_model(model), knobs, budget)
    assert b.sequences >= 1 and b.total <= budget <= gb * GIB    # the service starts: one full sequence fits
    assert plan.concurrent_sequences == b.sequences and plan.kv_cache_tokens == b.tokens == b.blocks * BLOCK_SIZE
    assert 1 <= knobs.max_batch_size <= 8                 # short requests share the blocks up to this
    assert b.images == knobs.max_images <= 4              # the image limit is what fits the context
    assert plan.required_free_bytes <= gb * GIB - 800 * MIB   # what the desktop leaves
    assert plan.context in (4096, 2048)
    assert b.sequences >= 2 or plan.context == 2048       # never a long context for one request


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
    assert (s.max_model_len, s.max_batch_size, s.max_images_per_request) == (
        knobs.max_model_len, knobs.max_batch_size, knobs.max_images)
    assert int(s.memory_budget_gib * GIB) == budget


def test_a_refusal_names_what_one_sequence_needs_by_the_block_rule():
    """Nothing fits 4 GiB: the refusal's figure is exactly the service's threshold for one 2048-token
    sequence with the cheapest knobs (nf4, the smallest images): its blocks + the scratch block."""
    from scripts.planner.plan import PIXEL_STEPS
    plan = plan_for(model=TWO_B, profile="8gb", gpu_memory_bytes=4 * GIB)
    assert not plan.fits and not plan.service_env
    spec, px = resolve_model(TWO_B), PIXEL_STEPS[-1]
    knobs = ServiceKnobs("nf4", px, images_that_fit(spec, px, 4, 2048), 8, 2048)
    b = predict_service(spec, knobs, 0)
    need = b.resident + b.prefill_reserve + b.headroom + (blocks_for(2048) + 1) * b.block_bytes
    assert predict_service(spec, knobs, need).sequences == 1
    assert predict_service(spec, knobs, need - 1).sequences == 0
    assert f"needs {need / GIB:.2f} GiB for one 2048-token sequence" in plan.refusal
    assert f"{blocks_for(2048)} blocks of {BLOCK_SIZE} tokens + the scratch block" in plan.refusal
