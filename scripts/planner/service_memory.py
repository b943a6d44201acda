"""Memory of vlkit's own service (the 8gb profile: transformers, one process), as predicted.

The service sizes itself at start-up by the rules of service/sizing.py (torch-free, imported here,
so the planner applies the very rules the service does); the planner estimates from the model's
shapes the two parts the service measures:

  resident        = weights + CUDA context and library workspaces (the service measures it by NVML;
                    sizing.CUDA_CONTEXT_BYTES is what it assumes where NVML does not answer)
  prefill reserve = peak of the largest admissible request's prefill: as many images of max_pixels
                    as fit the context (sizing.images_in_largest_request, at most
                    max_images_per_request), then text up to max_model_len - 1 tokens (the service
                    measures it once at start-up). The prefill (service/decode/qwen3_prefill.py) runs
                    the vision tower over batches of whole images (sizing.vision_batch_tokens) and
                    the decoder over passes of max_num_batched_tokens, writing K/V straight into the
                    cache's blocks:
                    reserve = fixed + held for all images + max(one vision batch's peak,
                                                               one pass over the whole prefix)
and the rest is sizing.plan_kv_blocks: KV blocks of BLOCK_SIZE tokens after HEADROOM_BYTES, at most
max_batch_size full-length sequences, one scratch block. A request reserves its blocks when it is
admitted, so up to max_batch_size short requests share the pool; the service refuses to start when
the blocks do not hold one sequence of max_model_len tokens. docs/PLANNER.md has the calibration.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from service.sizing import (
    BLOCK_SIZE, CUDA_CONTEXT_BYTES, DEFAULT_BATCHED_TOKENS, MIB, KVPlan, blocks_for, images_in_largest_request,
    plan_kv_blocks, vision_batch_tokens,
)

from .model_facts import decoder_bytes_per_token, encoder_output_bytes, max_image_tokens, vision_bytes_per_patch
from .models import ModelSpec, WeightFormat

# The prefill reserve (service/engine/startup.py `prefill_peak`: the larger of torch's allocated and reserved
# peaks and NVML's growth, over a second run of the largest request). Calibrated on an H100
# (random-weight Qwen3-VL-2B bf16, the engine's start-up log): 0.24 GiB for 1 image of 1,003,520 px at
# max_model_len 2048, 0.26 for 2 images at 2048, 0.30 for 4 images at 4096 (docs/PLANNER.md).
# What the measured peak holds beyond torch's allocated peak: the service's allocator maps expandable
# segments in 20 MiB pages (2 MiB for small tensors) and NVML counts what is mapped (2B, vision phase:
# 13-29 MiB above the allocated peak).
PREFILL_FIXED_BYTES = 32 * MIB
# One image through the vision tower (on top of what is held for the images), x vision_bytes_per_patch
# (a batch of several: their patches together, the tower's tensors being per patch): torch's allocated
# peak was 1.31 (2B/4B tower) and 1.33 (8B tower) x patches x vision_bytes_per_patch for one image
# (H100); four images in one forward (2B, 4096-token passes, H200) measured a 0.94 GiB reserve, which
# 1.46 (with the fixed part) meets, +0.019 to +0.038 GiB above the three one-image 2B measurements.
VISION_PEAK_FACTOR = 1.46
# One decoder pass: x its tokens x decoder_bytes_per_token (projections, MLP, rotary and norm
# temporaries, allocator fragmentation), plus x the prefix's bytes per token (attention_prefix_bytes).
# The three 2B measurements are bound by the vision phase, so these two are fit to text-only
# prefills measured as the engine measures them (random-weight 2B/4B/8B shapes, prefixes of 2047,
# 4095 and 16383 tokens, H100): the 4B shape needs the most; docs/PLANNER.md has the table.
DECODER_CHUNK_FACTOR = 1.5
ATTENTION_PREFIX_FACTOR = 1.3
# The planner's estimate of a prompt's length (the engine counts it with the real processor):
# chat-template tokens of a one-text-part user turn with the generation prompt
# ("<|im_start|>user\n" ... "x<|im_end|>\n<|im_start|>assistant\n"); each image adds
# <|vision_start|> and <|vision_end|> around its tokens.
TEMPLATE_TOKENS = 9
IMAGE_WRAPPER_TOKENS = 2


@dataclass(frozen=True)
class ServiceKnobs:
    weights: WeightFormat
    max_pixels: int
    max_images: int            # max_images_per_request
    max_batch_size: int
    max_model_len: int
    batched_tokens: int = DEFAULT_BATCHED_TOKENS  # max_num_batched_tokens: prompt tokens of one prefill pass


@dataclass(frozen=True)
class PrefillEstimate:
    """The largest admissible request's prefill, as predicted (bytes): what the service measures."""
    images: int                # images in the largest admissible request
    image_tokens: int          # per image
    fixed: int                 # PREFILL_FIXED_BYTES
    images_held: int           # every image's pixels and vision output, held until the text is done
    vision_batch: int          # images in one forward of the vision tower
    vision_peak: int           # one such forward, beyond what is held
    decoder_peak: int          # one pass of the decoder over a prefix of max_model_len - 1 tokens

    @property
    def reserve(self) -> int:
        return self.fixed + self.images_held + max(self.vision_peak, self.decoder_peak)


@dataclass(frozen=True)
class ServiceBudget:
    """The service's start-up plan for these knobs, as predicted: the estimates, and the KV blocks
    sizing.plan_kv_blocks gives them (``kv.budget`` is int(memory_budget_gib * GiB), as read)."""
    knobs: ServiceKnobs
    weights: int
    cuda_context: int
    prefill: PrefillEstimate
    kv_bytes_per_token: int
    kv: KVPlan

    @property
    def sequences(self) -> int:
        """Sequences of max_model_len tokens the blocks hold at once."""
        return self.kv.full_sequences

    @property
    def fits(self) -> bool:
        return self.sequences >= 1

    @property
    def one_sequence_bytes(self) -> int:
        """The budget that holds the blocks of one max_model_len sequence: what the service needs to start."""
        return replace(self.kv, blocks=blocks_for(self.kv.max_len, self.kv.block_size)).used


def images_that_fit(spec: ModelSpec, max_pixels: int, max_images: int, max_model_len: int) -> int:
    """Images of max_pixels in the largest request the service admits, by the planner's estimate of
    the prompt's length."""
    per_image = max_image_tokens(spec, max_pixels) + IMAGE_WRAPPER_TOKENS
    return images_in_largest_request(max_images, max_model_len, lambda n: TEMPLATE_TOKENS + n * per_image)


def image_held_bytes(spec: ModelSpec, image_tokens: int) -> int:
    """What the prefill holds for one image until the text is done: its pixel values in bf16 and its
    merged embeddings with the DeepStack features (bf16)."""
    v = spec.vision
    pixels = image_tokens * v.merge**2 * v.in_channels * v.temporal_patch * v.patch**2 * 2
    return pixels + encoder_output_bytes(spec, image_tokens)


def attention_prefix_bytes(spec: ModelSpec, chunk: int) -> int:
    """Bytes per prefix token of a chunk's attention, one layer at a time: K and V of the prefix
    repeated to every query head, the gathered K and V before the repeat (bf16), and the
    [chunk, prefix] bool mask with SDPA's bf16 form of it."""
    t = spec.text
    return 2 * 2 * (t.heads + t.kv_heads) * t.head_dim + 3 * chunk


def predict_prefill(spec: ModelSpec, knobs: ServiceKnobs) -> PrefillEstimate:
    image_tokens = max_image_tokens(spec, knobs.max_pixels)
    images = images_that_fit(spec, knobs.max_pixels, knobs.max_images, knobs.max_model_len)
    # The vision tower runs batches of whole images; every image's pixels and output stay until the end.
    held = images * image_held_bytes(spec, image_tokens)
    batch = vision_batch_tokens(knobs.batched_tokens, image_tokens, images) // image_tokens if images else 0
    patches = batch * image_tokens * spec.vision.merge**2
    vision = int(patches * vision_bytes_per_patch(spec) * VISION_PEAK_FACTOR)
    # The decoder runs passes of batched_tokens (short prompts packed: a pass is full whatever the
    # context); the largest prompt's last piece attends to all max_model_len - 1 tokens.
    prefix = max(0, knobs.max_model_len - 1)
    chunk = knobs.batched_tokens
    decoder = int(chunk * decoder_bytes_per_token(spec) * DECODER_CHUNK_FACTOR
                  + prefix * attention_prefix_bytes(spec, chunk) * ATTENTION_PREFIX_FACTOR)
    if knobs.weights == "nf4":  # bitsandbytes dequantizes each weight to bf16 for a many-token
        decoder += 2 * spec.text.hidden * spec.text.intermediate  # matmul: the largest (not measured)
    return PrefillEstimate(images, image_tokens, PREFILL_FIXED_BYTES, held, batch, vision, decoder)


# FP8 weights: what the engine holds beyond the tensors' bytes. Measured on an H200 (2026-12-01,
# random-weight Qwen3-VL-4B in Qwen's FP8 layout, 7.0 GiB budget): resident 6.18 GiB by NVML after the
# largest prefill, against 4.88 GiB of tensors + the 0.78 GiB CUDA context assumed: 523-533 MiB over
# the runs, not yet explained (the FP8 kernels' modules and cuBLASLt's block-scaled workspaces are
# candidates), so counted as measured, rounded up to 544 MiB, until it is: a plan must start (at
# 512 MiB the 8 GiB 4B-FP8 plan promised a block more than the card holds).
FP8_RESIDENT_EXTRA_BYTES = 544 * MIB


def predict_service(spec: ModelSpec, knobs: ServiceKnobs, budget: int) -> ServiceBudget:
    weights = spec.weight_bytes_as(knobs.weights) + (FP8_RESIDENT_EXTRA_BYTES if knobs.weights == "fp8" else 0)
    prefill = predict_prefill(spec, knobs)
    per_token = spec.kv_bytes_per_token(2)  # the service's KV cache is bf16
    kv = plan_kv_blocks(budget_bytes=budget, resident_bytes=weights + CUDA_CONTEXT_BYTES,
                        prefill_peak_bytes=prefill.reserve, block_bytes=BLOCK_SIZE * per_token,
                        max_len=knobs.max_model_len, max_sequences=knobs.max_batch_size)
    return ServiceBudget(knobs, weights, CUDA_CONTEXT_BYTES, prefill, per_token, kv)
