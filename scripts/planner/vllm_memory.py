"""vLLM's start-up memory accounting, modelled on the source of the version we pin (scripts.images).

What vLLM's V1 model runner does (docs/PLANNER.md has the links to each line; the 16gb profile runs
it on every platform, docs/PLANNER.md "WSL2 and vLLM's model runner"):
  requested   = ceil(total * gpu_memory_utilization); start-up fails if free memory < requested
  non_kv      = weights + non-torch growth + transient peak of the profiling run
  available   = requested - non_kv - CUDA graph estimate        ("Available KV cache memory")
  available <= 0                       -> "No available memory for the cache blocks"
  blocks(max_model_len) > available    -> "To serve at least one request with the model's max seq len"
The profiling run encodes dummy images of the processor's maximum size (as many as the encoder
budget holds), then runs max_num_batched_tokens through the decoder and the sampler on max_num_seqs
rows. Exact parts are ported (token counts, budgets, capture sizes, block sizes, the weights as the
allocator counts them: vllm_weights.py); activation bytes per patch / per token are estimates from
the layer shapes, and the constants below are fit to vLLM's own figures (docs/PLANNER.md, calibration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.sizing import MIB, blocks_for

from .model_facts import decoder_bytes_per_token, encoder_output_bytes, max_image_tokens, vision_bytes_per_patch
from .models import ModelSpec
from .sizes import gib
from .vllm_weights import load_bytes

VLLM_BLOCK_SIZE = 16                  # CacheConfig.DEFAULT_BLOCK_SIZE (vLLM's, not our service's)
DEFAULT_MAX_NUM_SEQS = 256            # get_batch_defaults(), OPENAI_API_SERVER, < 70 GiB cards
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
LARGE_GPU_BYTES = 70 * 1024**3        # H100-class: 1024 seqs / 8192 tokens by default
LARGE_MAX_NUM_SEQS = 1024
LARGE_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_IMAGE_LIMIT = 999             # no --limit-mm-per-prompt: the decoder budget is not the cap

# Estimates (bytes). Each names what it stands for; docs/PLANNER.md says where they come from.
# The vLLM worker's CUDA context, taken before vLLM's first memory snapshot: outside
# gpu_memory_utilization (our service's own figure is service.sizing.CUDA_CONTEXT_BYTES).
VLLM_CUDA_CONTEXT_BYTES = 512 * MIB
# Tensor parallel: NCCL and the custom all-reduce set up their buffers in init_device, before that
# snapshot (gpu_worker.py "Initialize the distributed environment BEFORE taking memory snapshot"),
# so they sit outside gpu_memory_utilization too, on every rank. Not yet measured (issue 17).
NCCL_BYTES = 256 * MIB
NON_TORCH_BYTES = 256 * MIB           # cuBLAS/attention workspaces, allocator slack after profiling
# The vision tower's peak in vLLM's profiling run, x vision_bytes_per_patch: vLLM's tower (flash
# attention over packed patches) keeps fewer temporaries alive than the shape count; fit to vLLM
# 0.24's figures with 7,840 patches (eager, 4B-FP8) and 65,536 patches (the seeds' command).
VISION_PEAK_FACTOR = 0.66
# CUDA graphs (profile_cudagraph_memory): per mode, the first capture (the largest batch) and one
# more, extrapolated: max(first captures) + per-graph x (graphs - 1) of each mode. Fit to vLLM 0.24's
# KV figures: 0.26-0.37 GiB for 8 sequences (4 + 5 graphs), ~0.6 GiB for vLLM's 256 (35 + 51).
GRAPH_FIRST_CAPTURE_BYTES = 280 * MIB
GRAPH_PER_CAPTURE_BYTES = 3 * MIB
SAMPLER_BYTES_PER_LOGIT = 32          # fp32 logits + sort values/int64 indices + probs (top-k/top-p)


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """VllmConfig._set_cudagraph_sizes: [1, 2, 4] + 8..248 step 8 + 256.. step 16 up to
    min(2 x max_num_seqs, 512, max_num_batched_tokens), plus max_num_batched_tokens if under that."""
    cap = min(max_num_seqs * 2, 512, max_num_batched_tokens)
    sizes = [s for s in [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16)) if s <= cap]
    if max_num_batched_tokens <= cap:
        sizes.append(max_num_batched_tokens)
    return sorted(set(sizes)) or [1]


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
    sampler: int                       # max_num_seqs rows of logits through top-k/top-p
    cuda_graphs: int
    graphs: int                        # CUDA graphs captured (both modes)
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

    @property
    def outside_requested(self) -> int:
        """What vLLM holds beside its gpu_memory_utilization share: the CUDA context (+ NCCL)."""
        return VLLM_CUDA_CONTEXT_BYTES + (NCCL_BYTES if self.knobs.tensor_parallel_size > 1 else 0)


def profiled_images(spec: ModelSpec, knobs: VllmKnobs) -> tuple[int, int]:
    """(images in the profiling run, tokens of each): MultiModalBudget + compute_mm_encoder_budget
    with chunked prefill on."""
    image_tokens = max_image_tokens(spec, knobs.max_pixels)
    if knobs.image_limit == 0:
        return 0, image_tokens
    encoder_budget = max(knobs.max_num_batched_tokens, image_tokens)
    per_prompt = max(1, min(knobs.image_limit, knobs.max_model_len // image_tokens))
    return max(1, min(encoder_budget // image_tokens, knobs.max_num_seqs * per_prompt)), image_tokens


def cuda_graph_bytes(spec: ModelSpec, knobs: VllmKnobs) -> tuple[int, int]:
    """(bytes, graphs) of FULL_AND_PIECEWISE capture: PIECEWISE for every capture size, FULL for the
    decode sizes up to max_num_seqs (CudagraphDispatcher.initialize_cudagraph_keys)."""
    if knobs.enforce_eager:
        return 0, 0
    sizes = capture_sizes(knobs.max_num_seqs, knobs.max_num_batched_tokens)
    piecewise, full = len(sizes), len([s for s in sizes if s <= knobs.max_num_seqs])
    first = GRAPH_FIRST_CAPTURE_BYTES + sizes[-1] * decoder_bytes_per_token(spec, knobs.tensor_parallel_size)
    return first + (piecewise - 1 + max(0, full - 1)) * GRAPH_PER_CAPTURE_BYTES, piecewise + full


def predict(spec: ModelSpec, knobs: VllmKnobs, *, total: int, free: int) -> VllmBudget:
    tp = knobs.tensor_parallel_size
    requested = math.ceil(total * knobs.gpu_memory_utilization)

    images, image_tokens = profiled_images(spec, knobs)
    tokens = images * image_tokens
    patches = tokens * spec.vision.merge**2
    enc_cache = encoder_output_bytes(spec, tokens)              # whole on every rank (gathered)
    encoder_peak = int(patches * vision_bytes_per_patch(spec, tp) * VISION_PEAK_FACTOR) + enc_cache

    # Decoder dummy run on max_num_batched_tokens, then the sampler on max_num_seqs rows (logits are
    # gathered whole to every rank).
    rows = min(knobs.max_num_seqs, knobs.max_num_batched_tokens)
    decoder = knobs.max_num_batched_tokens * decoder_bytes_per_token(spec, tp)
    sampler = rows * spec.text.vocab * SAMPLER_BYTES_PER_LOGIT
    decoder_peak = enc_cache + max(decoder, sampler)
    graphs, graph_count = cuda_graph_bytes(spec, knobs)

    kv_dtype_bytes = 1 if knobs.kv_cache_dtype.startswith("fp8") else 2
    per_token = spec.kv_bytes_per_token(kv_dtype_bytes, tp)
    budget = VllmBudget(
        knobs=knobs, total=total, free=free, requested=requested,
        weights=load_bytes(spec, max_num_batched_tokens=knobs.max_num_batched_tokens, tp=tp),
        non_torch=NON_TORCH_BYTES, encoder_peak=encoder_peak, decoder_peak=decoder_peak,
        encoder_cache=enc_cache, sampler=sampler, cuda_graphs=graphs, graphs=graph_count,
        image_tokens=image_tokens, profiled_images=images, kv_available=0, kv_bytes_per_token=per_token,
        kv_tokens=0, kv_needed=blocks_for(knobs.max_model_len, VLLM_BLOCK_SIZE) * VLLM_BLOCK_SIZE * per_token,
    )
    budget.kv_available = requested - budget.non_kv
    block_bytes = VLLM_BLOCK_SIZE * per_token
    budget.kv_tokens = max(0, budget.kv_available // block_bytes) * VLLM_BLOCK_SIZE

    # The checks vLLM makes, in its order, with its words.
    if free - budget.outside_requested < requested:
        budget.errors.append(
            f"Free memory on device ({gib(free - budget.outside_requested)}/{gib(total)} GiB) on startup is "
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
