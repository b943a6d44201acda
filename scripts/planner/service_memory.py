"""Memory of vlkit's own service (the 8gb profile: transformers, bf16 or nf4, one process).

A mirror of how the service sizes itself on CUDA (service/engine.py ``_plan_memory``,
``_largest_prompt``; service/memory.py ``plan_kv_blocks``), so that a plan the planner calls fitting
is one the service starts with:

  resident        = weights + CUDA context and library workspaces (the service measures it by NVML)
  prefill reserve = peak of the largest admissible request's prefill: as many images of max_pixels
                    as fit the context (at most max_images_per_request), then text up to
                    max_model_len - 1 tokens (the service measures it once at start-up). The prefill
                    (service/decode/qwen3_prefill.py) runs the vision tower one image at a time and
                    the decoder over 1024-token chunks, writing K/V straight into the cache's blocks:
                    reserve = fixed + held for all images + max(one image's vision peak,
                                                               one chunk over the whole prefix)
  headroom        = service.memory.HEADROOM_BYTES
  KV cache        = a paged pool of blocks of BLOCK_SIZE (64) tokens of bf16 K and V, every layer,
                    plus one scratch block:
                    free = budget - resident - reserve - headroom
                    blocks = min(max_batch_size * ceil(max_model_len / 64), free // block - 1)
A request reserves ceil((prompt + max_tokens) / 64) blocks when it is admitted, so up to
max_batch_size short requests share the pool; the service refuses to start when the blocks do not
hold one sequence of max_model_len tokens. The planner estimates what the service measures
(resident, reserve) from the model's shapes; docs/PLANNER.md has the calibration.

service.memory imports torch, which the host must not: the constants that mirror the service's are
copied here, and tests/test_planner_service_memory.py asserts they match.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models import ModelSpec
from .vllm_memory import decoder_bytes_per_token, encoder_output_bytes, max_image_tokens, vision_bytes_per_patch

GIB = 1024**3
MIB = 1024**2

HEADROOM_BYTES = 256 * MIB            # = service.memory.HEADROOM_BYTES
BLOCK_SIZE = 64                       # = service.decode.cache.BLOCK_SIZE: tokens per KV block
# Measured (NVML) on an H100, Qwen3-VL-2B bf16 after load: resident 4.74-4.76 GiB with 3.96 GiB of
# weights, so ~0.8 GiB of CUDA context, cuBLAS and attention workspaces.
CUDA_CONTEXT_BYTES = 800 * MIB
# The prefill reserve (service/engine.py `_prefill_peak`: the larger of torch's allocated and
# reserved peaks and NVML's growth, over a second run of the largest request). Calibrated on an H100
# (random-weight Qwen3-VL-2B bf16, the engine's start-up log): 0.24 GiB for 1 image of 1,003,520 px at
# max_model_len 2048, 0.26 for 2 images at 2048, 0.30 for 4 images at 4096 (docs/PLANNER.md).
PREFILL_CHUNK = 1024                  # = service.decode.qwen3_prefill.DEFAULT_CHUNK: tokens of one decoder pass
# What the measured peak holds beyond torch's allocated peak: the service's allocator maps expandable
# segments in 20 MiB pages (2 MiB for small tensors) and NVML counts what is mapped (2B, vision phase:
# 13-29 MiB above the allocated peak).
PREFILL_FIXED_BYTES = 32 * MIB
# One image through the vision tower (on top of what is held for the images), x vision_bytes_per_patch:
# torch's allocated peak was 1.31 (2B/4B tower) and 1.33 (8B tower) x patches x vision_bytes_per_patch;
# 1.4 (with the fixed part) predicts the three 2B measurements +0.011, +0.017 and +0.030 GiB high.
VISION_PEAK_FACTOR = 1.4
# One decoder chunk: x PREFILL_CHUNK x decoder_bytes_per_token (projections, MLP, rotary and norm
# temporaries, allocator fragmentation), plus x the prefix's bytes per token (attention_prefix_bytes).
# The three 2B measurements are bound by the vision phase, so these two are fit to text-only
# prefills measured as the engine measures them (random-weight 2B/4B/8B shapes, prefixes of 2047,
# 4095 and 16383 tokens, H100): the 4B shape needs the most; docs/PLANNER.md has the table.
DECODER_CHUNK_FACTOR = 1.5
ATTENTION_PREFIX_FACTOR = 1.3
# Chat-template tokens of a one-text-part user turn with the generation prompt
# ("<|im_start|>user\n" ... "x<|im_end|>\n<|im_start|>assistant\n"); each image adds
# <|vision_start|> and <|vision_end|> around its tokens.
TEMPLATE_TOKENS = 9
IMAGE_WRAPPER_TOKENS = 2


@dataclass(frozen=True)
class ServiceKnobs:
    quantization: str          # "none" | "nf4"
    max_pixels: int
    max_images: int            # max_images_per_request
    max_batch_size: int
    max_model_len: int


@dataclass
class ServiceBudget:
    """The service's start-up plan for these knobs, as predicted (bytes)."""
    knobs: ServiceKnobs
    budget: int                # int(memory_budget_gib * GiB), as the service reads it
    weights: int
    cuda_context: int
    images: int                # images in the largest admissible request
    image_tokens: int          # per image
    prefill_fixed: int         # PREFILL_FIXED_BYTES
    images_held: int           # every image's pixels and vision output, held until the text is done
    vision_peak: int           # one image through the vision tower, beyond what is held
    decoder_peak: int          # one chunk of the decoder over a prefix of max_model_len - 1 tokens
    block_bytes: int           # BLOCK_SIZE tokens of K and V, every layer
    blocks: int                # usable blocks (the pool holds one more: the scratch block)
    kv_bytes_per_token: int
    headroom: int = HEADROOM_BYTES

    @property
    def resident(self) -> int:
        return self.weights + self.cuda_context

    @property
    def prefill_reserve(self) -> int:
        return self.prefill_fixed + self.images_held + max(self.vision_peak, self.decoder_peak)

    @property
    def free_for_kv(self) -> int:
        return self.budget - self.resident - self.prefill_reserve - self.headroom

    @property
    def blocks_per_sequence(self) -> int:
        return blocks_for(self.knobs.max_model_len)

    @property
    def sequences(self) -> int:
        """Sequences of max_model_len tokens the blocks hold at once (KVPlan.full_sequences)."""
        return self.blocks // self.blocks_per_sequence

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK_SIZE

    @property
    def kv(self) -> int:
        return (self.blocks + 1) * self.block_bytes

    @property
    def total(self) -> int:
        return self.resident + self.prefill_reserve + self.headroom + self.kv

    @property
    def fits(self) -> bool:
        return self.sequences >= 1


def images_that_fit(spec: ModelSpec, max_pixels: int, max_images: int, max_model_len: int) -> int:
    """service/engine.py ``_largest_prompt``: drop images until the prompt is shorter than the context."""
    per_image = max_image_tokens(max_pixels, spec) + IMAGE_WRAPPER_TOKENS
    count = max(0, max_images)
    while count and TEMPLATE_TOKENS + count * per_image >= max_model_len:
        count -= 1
    return count


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """service.decode.cache.blocks_for: the blocks `tokens` tokens take."""
    return -(-tokens // block_size)


def kv_blocks_that_fit(*, budget: int, resident: int, prefill_reserve: int, block_bytes: int, max_len: int,
                       max_sequences: int, block_size: int = BLOCK_SIZE, headroom: int = HEADROOM_BYTES) -> int:
    """service.memory.plan_kv_blocks(...).blocks: as many blocks as fit beside the rest (one of them
    scratch), at most enough for `max_sequences` sequences of `max_len` tokens."""
    free = budget - resident - prefill_reserve - headroom
    return max(0, min(max_sequences * blocks_for(max_len, block_size), free // block_bytes - 1))


def image_held_bytes(spec: ModelSpec, image_tokens: int) -> int:
    """What the prefill holds for one image until the text is done: its pixel values in bf16 and its
    merged embeddings with the DeepStack features (bf16)."""
    v = spec.vision
    pixels = image_tokens * v.merge**2 * v.in_channels * v.temporal_patch * v.patch**2 * 2
    return pixels + encoder_output_bytes(spec, image_tokens)


def attention_prefix_bytes(spec: ModelSpec, chunk: int = PREFILL_CHUNK) -> int:
    """Bytes per prefix token of a chunk's attention, one layer at a time: K and V of the prefix
    repeated to every query head, the gathered K and V before the repeat (bf16), and the
    [chunk, prefix] bool mask with SDPA's bf16 form of it."""
    t = spec.text
    return 2 * 2 * (t.heads + t.kv_heads) * t.head_dim + 3 * chunk


def predict_service(spec: ModelSpec, knobs: ServiceKnobs, budget: int) -> ServiceBudget:
    weights = spec.nf4_weight_bytes() if knobs.quantization == "nf4" else spec.bf16_weight_bytes
    image_tokens = max_image_tokens(knobs.max_pixels, spec)
    images = images_that_fit(spec, knobs.max_pixels, knobs.max_images, knobs.max_model_len)
    # The vision tower runs one image at a time; every image's pixels and output stay until the end.
    held = images * image_held_bytes(spec, image_tokens)
    patches = image_tokens * spec.vision.merge**2 if images else 0
    vision = int(patches * vision_bytes_per_patch(spec) * VISION_PEAK_FACTOR)
    # The decoder runs 1024-token chunks; the last one attends to all max_model_len - 1 tokens.
    prefix = max(0, knobs.max_model_len - 1)
    chunk = min(PREFILL_CHUNK, prefix)
    decoder = int(chunk * decoder_bytes_per_token(spec) * DECODER_CHUNK_FACTOR
                  + prefix * attention_prefix_bytes(spec, chunk) * ATTENTION_PREFIX_FACTOR)
    if knobs.quantization == "nf4":  # bitsandbytes dequantizes each weight to bf16 for a many-token
        decoder += 2 * spec.text.hidden * spec.text.intermediate  # matmul: the largest (not measured)
    per_token = spec.kv_bytes_per_token(2)
    b = ServiceBudget(knobs=knobs, budget=budget, weights=weights, cuda_context=CUDA_CONTEXT_BYTES, images=images,
                      image_tokens=image_tokens, prefill_fixed=PREFILL_FIXED_BYTES, images_held=held,
                      vision_peak=vision, decoder_peak=decoder, block_bytes=BLOCK_SIZE * per_token, blocks=0,
                      kv_bytes_per_token=per_token)
    b.blocks = kv_blocks_that_fit(budget=budget, resident=b.resident, prefill_reserve=b.prefill_reserve,
                                  block_bytes=b.block_bytes, max_len=knobs.max_model_len,
                                  max_sequences=knobs.max_batch_size)
    return b
