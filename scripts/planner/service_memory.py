"""Memory of vlkit's own service (the 8gb profile: transformers, bf16 or nf4, one process).

The service keeps its whole process under VLKIT_MEMORY_BUDGET_GIB (service/memory.py admits a
request only when its KV cache and prefill fit). The planner sizes the knobs so that the worst case
the settings allow fits that budget: the weights, the vision tower on the largest request's images,
max_batch_size sequences of max_model_len tokens of bf16 KV cache (full attention, every layer),
one full-context prefill and the CUDA context.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models import ModelSpec
from .vllm_memory import vision_bytes_per_patch, max_image_tokens, decoder_bytes_per_token

MIB = 1024**2
SERVICE_CUDA_CONTEXT_BYTES = 600 * MIB   # the figure service/memory.py takes off the top
# transformers' eager vision tower keeps more alive than vLLM's fused one (fp32 rotary, masks).
TRANSFORMERS_VISION_FACTOR = 1.5
ALLOCATOR_SLACK_BYTES = 256 * MIB        # torch caching-allocator fragmentation


@dataclass(frozen=True)
class ServiceKnobs:
    quantization: str          # "none" | "nf4"
    max_pixels: int
    max_images: int            # per request
    max_batch_size: int
    max_model_len: int


@dataclass
class ServiceBudget:
    knobs: ServiceKnobs
    weights: int
    vision: int
    prefill: int
    kv: int                    # max_batch_size x max_model_len
    kv_bytes_per_token: int
    cuda_context: int = SERVICE_CUDA_CONTEXT_BYTES
    slack: int = ALLOCATOR_SLACK_BYTES

    @property
    def total(self) -> int:
        # The vision tower runs during a prefill, before that request's KV exists; count both anyway:
        # other rows' caches are alive while a new request is encoded.
        return self.weights + self.vision + self.prefill + self.kv + self.cuda_context + self.slack


def predict_service(spec: ModelSpec, knobs: ServiceKnobs) -> ServiceBudget:
    weights = spec.nf4_weight_bytes() if knobs.quantization == "nf4" else spec.bf16_weight_bytes
    patches = knobs.max_images * max_image_tokens(knobs.max_pixels, spec) * spec.vision.merge**2
    vision = int(patches * vision_bytes_per_patch(spec) * TRANSFORMERS_VISION_FACTOR)
    logits = spec.text.vocab * 4 * knobs.max_batch_size
    prefill = knobs.max_model_len * decoder_bytes_per_token(spec) + logits
    per_token = spec.kv_bytes_per_token(2)
    return ServiceBudget(knobs=knobs, weights=weights, vision=vision, prefill=prefill,
                         kv=knobs.max_batch_size * knobs.max_model_len * per_token,
                         kv_bytes_per_token=per_token)
