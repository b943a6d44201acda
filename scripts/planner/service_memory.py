"""Memory of vlkit's own service (the 8gb profile: transformers, bf16 or nf4, one process).

A mirror of how the service sizes itself on CUDA (service/engine.py ``_plan_memory``,
``_largest_prompt``; service/memory.py ``plan_slots``), so that a plan the planner calls fitting is
one the service starts with:

  resident        = weights + CUDA context and library workspaces (the service measures it by NVML)
  prefill reserve = activation peak of the largest admissible request: as many images of max_pixels
                    as fit the context (at most max_images_per_request), then text up to
                    max_model_len - 1 tokens (the service measures it once at start-up)
  headroom        = service.memory.HEADROOM_BYTES
  KV cache        = whole slots of (max_model_len + 1) tokens of bf16 K and V, every layer;
                    slots = min(max_batch_size, (budget - resident - reserve - headroom) // slot)
The service refuses to start when no slot fits. The planner estimates what the service measures
(resident, reserve) from the model's shapes; docs/PLANNER.md has the calibration.

service.memory imports torch, which the host must not: the constants that mirror the service's are
copied here, and tests/test_planner_service_memory.py asserts they match.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models import ModelSpec
from .vllm_memory import decoder_bytes_per_token, max_image_tokens, vision_bytes_per_patch

GIB = 1024**3
MIB = 1024**2

HEADROOM_BYTES = 256 * MIB            # = service.memory.HEADROOM_BYTES
SLOT_EXTRA_TOKENS = 1                 # a slot holds max_model_len + 1 tokens (service/engine.py, slot_bytes)
# Measured (NVML) on an H100, Qwen3-VL-2B bf16 after load: resident 4.74-4.76 GiB with 3.96 GiB of
# weights, so ~0.8 GiB of CUDA context, cuBLAS and attention workspaces.
CUDA_CONTEXT_BYTES = 800 * MIB
# The prefill of the largest request, as the service measures it (torch's peak over allocated):
# the prompt's own DynamicCache (bf16 K/V of every token) plus the decoder's live activations, and a
# fixed part (workspaces, the images' embeddings). Calibrated on an H100 with Qwen3-VL-2B: 0.54 GiB
# for 1 image of 1,003,520 px at max_model_len 2048, 1.03 GiB for 4 images at 4096
# (docs/PLANNER.md, "The 8gb service").
PREFILL_FIXED_BYTES = 52 * MIB
PREFILL_ACTIVATION_FACTOR = 2.32      # x decoder_bytes_per_token, per prompt token
# transformers' eager vision tower keeps more alive than vLLM's fused one (fp32 rotary, masks); it
# runs before the decoder, so the reserve is the larger of the two phases, not their sum.
TRANSFORMERS_VISION_FACTOR = 1.5
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
    vision_peak: int
    decoder_peak: int
    slot_bytes: int
    slots: int
    kv_bytes_per_token: int
    headroom: int = HEADROOM_BYTES

    @property
    def resident(self) -> int:
        return self.weights + self.cuda_context

    @property
    def prefill_reserve(self) -> int:
        return max(self.vision_peak, self.decoder_peak)

    @property
    def free_for_kv(self) -> int:
        return self.budget - self.resident - self.prefill_reserve - self.headroom

    @property
    def kv(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def total(self) -> int:
        return self.resident + self.prefill_reserve + self.headroom + self.kv

    @property
    def fits(self) -> bool:
        return self.slots >= 1


def images_that_fit(spec: ModelSpec, max_pixels: int, max_images: int, max_model_len: int) -> int:
    """service/engine.py ``_largest_prompt``: drop images until the prompt is shorter than the context."""
    per_image = max_image_tokens(max_pixels, spec) + IMAGE_WRAPPER_TOKENS
    count = max(0, max_images)
    while count and TEMPLATE_TOKENS + count * per_image >= max_model_len:
        count -= 1
    return count


def slots_that_fit(*, budget: int, resident: int, prefill_reserve: int, slot_bytes: int, max_slots: int,
                   headroom: int = HEADROOM_BYTES) -> int:
    """service.memory.plan_slots."""
    return max(0, min(max_slots, (budget - resident - prefill_reserve - headroom) // slot_bytes))


def predict_service(spec: ModelSpec, knobs: ServiceKnobs, budget: int) -> ServiceBudget:
    weights = spec.nf4_weight_bytes() if knobs.quantization == "nf4" else spec.bf16_weight_bytes
    image_tokens = max_image_tokens(knobs.max_pixels, spec)
    images = images_that_fit(spec, knobs.max_pixels, knobs.max_images, knobs.max_model_len)
    patches = images * image_tokens * spec.vision.merge**2
    vision = int(patches * vision_bytes_per_patch(spec) * TRANSFORMERS_VISION_FACTOR)
    per_token = spec.kv_bytes_per_token(2)
    tokens = max(0, knobs.max_model_len - 1)
    decoder = PREFILL_FIXED_BYTES + int(tokens * (per_token + PREFILL_ACTIVATION_FACTOR * decoder_bytes_per_token(spec)))
    slot = (knobs.max_model_len + SLOT_EXTRA_TOKENS) * per_token
    b = ServiceBudget(knobs=knobs, budget=budget, weights=weights, cuda_context=CUDA_CONTEXT_BYTES, images=images,
                      image_tokens=image_tokens, vision_peak=vision, decoder_peak=decoder, slot_bytes=slot,
                      slots=0, kv_bytes_per_token=per_token)
    b.slots = slots_that_fit(budget=budget, resident=b.resident, prefill_reserve=b.prefill_reserve,
                             slot_bytes=slot, max_slots=knobs.max_batch_size)
    return b
