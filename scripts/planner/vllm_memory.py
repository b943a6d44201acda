"""vLLM's start-up memory accounting, modelled on the source of the version we pin (scripts.images).

What vLLM does (docs/PLANNER.md has the links to each line):
  requested   = ceil(total * gpu_memory_utilization); start-up fails if free memory < requested
  non_kv      = weights + non-torch growth + transient peak of the profiling run
  available   = requested - non_kv - CUDA graph estimate        ("Available KV cache memory")
  available <= 0                       -> "No available memory for the cache blocks"
  blocks(max_model_len) > available    -> "To serve at least one request with the model's max seq len"
The profiling run encodes dummy images of the processor's maximum size (as many as the encoder
budget holds), then runs max_num_batched_tokens through the decoder and the sampler on max_num_seqs
rows. Exact parts are ported (token counts, budgets, capture sizes, block sizes); activation bytes
per patch / per token are estimates from the layer shapes, named below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.sizing import GIB, MIB, blocks_for

from .model_facts import decoder_bytes_per_token, encoder_output_bytes, max_image_tokens, vision_bytes_per_patch
from .models import ModelSpec
from .sizes import gib

VLLM_BLOCK_SIZE = 16                  # CacheConfig.DEFAULT_BLOCK_SIZE (vLLM's, not our service's)
DEFAULT_MAX_NUM_SEQS = 256            # get_batch_defaults(), OPENAI_API_SERVER, < 70 GiB cards
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
LARGE_GPU_BYTES = 70 * GIB            # H100-class: 1024 seqs / 8192 tokens by default
LARGE_MAX_NUM_SEQS = 1024
LARGE_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_IMAGE_LIMIT = 999             # no --limit-mm-per-prompt: the decoder budget is not the cap

# Estimates (bytes). Each names what it stands for; docs/PLANNER.md says where they come from.
# The vLLM worker's CUDA context, taken before vLLM's first memory snapshot: outside
# gpu_memory_utilization (our service's own figure is service.sizing.CUDA_CONTEXT_BYTES).
VLLM_CUDA_CONTEXT_BYTES = 512 * MIB
NON_TORCH_BYTES = 256 * MIB           # cuBLAS/attention workspaces, allocator slack after profiling
NCCL_BYTES = 256 * MIB                # per rank when tensor parallel (communicator buffers)
GRAPH_BASE_BYTES = 64 * MIB           # first capture of each mode (its private pool)
GRAPH_PER_CAPTURE_BYTES = 2 * MIB     # each further captured batch size, per mode
SAMPLER_BYTES_PER_LOGIT = 32          # fp32 logits + sort values/int64 indices + probs (top-k/top-p)


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """VllmConfig._set_cudagraph_sizes: [1, 2, 4] + 8..248 step 8 + 256.. step 16, up to the cap."""
    cap = min(max_num_seqs * 2, 512, max_num_batched_tokens)
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, cap + 1, 16))
    return [s for s in sizes if s <= cap] or [1]


@dataclass(frozen=True)
class VllmKnobs:
    """What `vllm serve` is started with (only what matters to memory)."""
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_pixels: int
    image_limit: int
    kv_cache_dtype: str = "auto"       # "auto" (the model dtype, bf16) | "fp8"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1


@dataclass
class VllmBudget:
    """One rank's prediction, in bytes."""
    knobs: VllmKnobs
    total: int
    free: int                          # before vLLM starts
    requested: int
    weights: int
    non_torch: int
    encoder_peak: int
    decoder_peak: int
    encoder_cache: int                 # encoder outputs held through the decoder pass
    cuda_graphs: int
    image_tokens: int
    profiled_images: int
    kv_available: int
    kv_bytes_per_token: int
    kv_tokens: int
    kv_needed: int                     # one max_model_len sequence, whole blocks
    errors: list[str] = field(default_factory=list)

    @property
    def activations(self) -> int:
        return max(self.encoder_peak, self.decoder_peak)

    @property
    def non_kv(self) -> int:
        return self.weights + self.non_torch + self.activations + self.cuda_graphs


def predict(spec: ModelSpec, knobs: VllmKnobs, *, total: int, free: int) -> VllmBudget:
    tp = knobs.tensor_parallel_size
    requested = math.ceil(total * knobs.gpu_memory_utilization)

    # Multimodal profiling (MultiModalBudget + compute_mm_encoder_budget, chunked prefill on).
    image_tokens = max_image_tokens(spec, knobs.max_pixels)
    encoder_budget = max(knobs.max_num_batched_tokens, image_tokens)
    per_prompt = max(1, min(knobs.image_limit, knobs.max_model_len // image_tokens))
    images = max(1, min(encoder_budget // image_tokens, knobs.max_num_seqs * per_prompt))
    if knobs.image_limit == 0:
        images = 0
    tokens = images * image_tokens
    patches = tokens * spec.vision.merge**2
    enc_cache = encoder_output_bytes(spec, tokens) // tp
    encoder_peak = patches * vision_bytes_per_patch(spec) // tp + enc_cache

    # Decoder dummy run on max_num_batched_tokens, then the sampler on max_num_seqs rows.
    rows = min(knobs.max_num_seqs, knobs.max_num_batched_tokens)
    decoder = knobs.max_num_batched_tokens * decoder_bytes_per_token(spec) // tp
    sampler = rows * spec.text.vocab * SAMPLER_BYTES_PER_LOGIT
    decoder_peak = enc_cache + max(decoder, sampler)

    graphs = 0
    if not knobs.enforce_eager:
        sizes = capture_sizes(knobs.max_num_seqs, knobs.max_num_batched_tokens)
        n, largest = len(sizes), sizes[-1]
        # FULL_AND_PIECEWISE: two modes, each a first capture plus a small per-size cost.
        graphs = 2 * (GRAPH_BASE_BYTES + (n - 1) * GRAPH_PER_CAPTURE_BYTES) \
            + largest * decoder_bytes_per_token(spec) // tp

    weights = spec.weight_bytes // tp
    non_torch = NON_TORCH_BYTES + (NCCL_BYTES if tp > 1 else 0)
    kv_dtype_bytes = 1 if knobs.kv_cache_dtype.startswith("fp8") else 2
    per_token = spec.kv_bytes_per_token(kv_dtype_bytes, tp)
    budget = VllmBudget(
        knobs=knobs, total=total, free=free, requested=requested, weights=weights,
        non_torch=non_torch, encoder_peak=encoder_peak, decoder_peak=decoder_peak,
        encoder_cache=enc_cache, cuda_graphs=graphs, image_tokens=image_tokens,
        profiled_images=images, kv_available=0, kv_bytes_per_token=per_token, kv_tokens=0,
        kv_needed=blocks_for(knobs.max_model_len, VLLM_BLOCK_SIZE) * VLLM_BLOCK_SIZE * per_token,
    )
    budget.kv_available = requested - budget.non_kv
    block_bytes = VLLM_BLOCK_SIZE * per_token
    budget.kv_tokens = max(0, budget.kv_available // block_bytes) * VLLM_BLOCK_SIZE

    # The checks vLLM makes, in its order, with its words.
    if free - VLLM_CUDA_CONTEXT_BYTES < requested:
        budget.errors.append(
            f"Free memory on device ({gib(free - VLLM_CUDA_CONTEXT_BYTES)}/{gib(total)} GiB) on startup is "
            f"less than desired GPU memory utilization ({knobs.gpu_memory_utilization}, "
            f"{gib(requested)} GiB)")
    if budget.kv_available <= 0:
        budget.errors.append(
            f"No available memory for the cache blocks (Available KV cache memory: "
            f"{gib(budget.kv_available)} GiB)")
    elif budget.kv_needed > budget.kv_available:
        budget.errors.append(
            f"To serve at least one request with the model's max seq len ({knobs.max_model_len}), "
            f"({gib(budget.kv_needed)} GiB KV cache is needed, which is larger than the available KV "
            f"cache memory ({gib(budget.kv_available)} GiB). Based on the available memory, the "
            f"estimated maximum model length is {budget.kv_tokens}.")
    return budget
