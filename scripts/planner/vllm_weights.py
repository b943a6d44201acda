"""What vLLM's "Model loading took N GiB" holds for a Qwen3-VL checkpoint, per GPU.

vLLM measures the torch memory allocated while it builds and loads the model (the V1 runner's
load_model inside DeviceMemoryProfiler, the same in 0.24 and 0.27): the parameters, the buffers the
modules register, and what torch's CUDA allocator rounds each of them up to. For Qwen3-VL that is
  - the parameters of vLLM's own modules (fused qkv_proj / gate_up_proj, vocab-parallel embedding
    and lm_head, the vision tower), split across tensor-parallel ranks as vLLM splits them;
  - the text rotary cache: MRotaryEmbedding keeps cos/sin for 4 x max_position_embeddings
    positions (rotary_embedding/mrope.py, "cache_max_position_num"), 256 MiB in bf16 for every
    Qwen3-VL size, on every rank;
  - the DeepStack buffers: one [max_num_batched_tokens, text hidden] bf16 tensor per DeepStack
    level (qwen3_vl.py, "deepstack_input_embeds"), on every rank;
  - allocator rounding: load runs with max_split_size_mb=20 (gpu_worker.py load_model), so a
    tensor of 10 MiB or more takes a whole segment rounded up to 2 MiB unless more than 1 MiB of
    it is left and the tensor is under 20 MiB (c10/cuda/CUDACachingAllocator.cpp should_split).
Held to vLLM 0.27's own modules (built on the meta device) and to the weights vLLM 0.24 logged on
the GPU machine by tests/test_planner_vllm_weights.py.
"""
from __future__ import annotations

from collections.abc import Iterator

from service.sizing import MIB

from .models import ModelSpec

FP8_BLOCK = 128                      # weight_block_size of Qwen's -FP8 checkpoints (one fp32 scale a block)
VOCAB_PADDING = 64                   # vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE
MROPE_CACHE_POSITIONS = 4            # MRotaryEmbedding caches 4 x max_position_embeddings positions
VISION_ROPE_POSITIONS = 8192         # the vision tower's get_rope(max_position=8192)

# torch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp)
_MIN_BLOCK = 512
_SMALL_SIZE = 1 * MIB                # largest "small" allocation
_MIN_LARGE_ALLOC = 10 * MIB          # from here on, one segment rounded up to 2 MiB
_ROUND_LARGE = 2 * MIB
_LOAD_MAX_SPLIT = 20 * MIB           # max_split_size_mb while vLLM loads weights


def allocated_bytes(nbytes: int) -> int:
    """What torch counts as allocated for one tensor of ``nbytes`` made while vLLM loads weights."""
    size = max(_MIN_BLOCK, -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK)
    if size < _MIN_LARGE_ALLOC:   # packed into shared 2 MiB / 20 MiB segments, split off exactly
        return size
    segment = -(-size // _ROUND_LARGE) * _ROUND_LARGE
    split = size < _LOAD_MAX_SPLIT and segment - size > _SMALL_SIZE
    return size if split else segment


def _linear(out: int, inp: int, fp8: bool) -> Iterator[int]:
    """A linear layer's weight (and, block-FP8, its fp32 scale per 128 x 128 block)."""
    if fp8:
        yield out * inp
        yield -(-out // FP8_BLOCK) * -(-inp // FP8_BLOCK) * 4
    else:
        yield out * inp * 2


def _text(spec: ModelSpec, tp: int) -> Iterator[int]:
    t, fp8 = spec.text, spec.fp8_checkpoint
    heads, kv = t.heads // tp, max(1, t.kv_heads // tp)
    for _ in range(t.layers):
        yield from _linear((heads + 2 * kv) * t.head_dim, t.hidden, fp8)     # qkv_proj (column parallel)
        yield from _linear(t.hidden, heads * t.head_dim, fp8)                # o_proj (row parallel)
        yield from _linear(2 * t.intermediate // tp, t.hidden, fp8)          # gate_up_proj
        yield from _linear(t.hidden, t.intermediate // tp, fp8)              # down_proj
        yield from (2 * t.head_dim, 2 * t.head_dim, 2 * t.hidden, 2 * t.hidden)  # q/k norm, layer norms
        yield from (4, 4, 4, 4)                                              # fp32 _q/_k/_v/_prob_scale buffers
        if fp8:
            yield from (2, 2, 2, 2)                                          # and the checkpoint's scales
    vocab = -(-t.vocab // VOCAB_PADDING) * VOCAB_PADDING // tp
    yield vocab * t.hidden * 2                                               # embed_tokens
    if not t.tied_embeddings:
        yield vocab * t.hidden * 2                                           # lm_head
    yield 2 * t.hidden                                                       # final norm


def _vision(spec: ModelSpec, tp: int) -> Iterator[int]:
    v = spec.vision
    fp8 = spec.fp8_checkpoint and spec.vision_quantized
    yield v.in_channels * v.temporal_patch * v.patch**2 * v.hidden * 2       # patch_embed (Conv3d), replicated
    yield 2 * v.hidden
    yield v.num_position_embeddings * v.hidden * 2                           # pos_embed
    for _ in range(v.depth):
        yield from (2 * v.hidden,) * 4                                       # norm1/norm2 weight and bias
        yield from _linear(3 * v.hidden // tp, v.hidden, fp8)                # attn.qkv
        yield 3 * v.hidden // tp * 2
        yield from _linear(v.hidden, v.hidden // tp, fp8)                    # attn.proj (row parallel)
        yield 2 * v.hidden
        yield from _linear(v.intermediate // tp, v.hidden, fp8)              # mlp.linear_fc1
        yield 2 * v.intermediate // tp
        yield from _linear(v.hidden, v.intermediate // tp, fp8)              # mlp.linear_fc2 (row parallel)
        yield 2 * v.hidden
    merged = v.hidden * v.merge**2
    for i in range(1 + v.deepstack):                                         # merger + deepstack mergers
        norm = v.hidden if i == 0 else merged                                # the main merger norms before merging
        yield from (2 * norm, 2 * norm)
        yield from _linear(merged // tp, merged, fp8)
        yield 2 * merged // tp
        yield from _linear(v.out_hidden, merged // tp, fp8)
        yield 2 * v.out_hidden


def _buffers(spec: ModelSpec, max_num_batched_tokens: int) -> Iterator[int]:
    t, v = spec.text, spec.vision
    yield MROPE_CACHE_POSITIONS * t.max_position * t.head_dim * 2            # text cos/sin cache (bf16)
    yield VISION_ROPE_POSITIONS * (v.hidden // v.heads // 2) * 2             # vision cos/sin cache
    for _ in range(v.deepstack):
        yield max_num_batched_tokens * t.hidden * 2                          # deepstack_input_embeds


def tensor_bytes(spec: ModelSpec, *, max_num_batched_tokens: int, tp: int = 1) -> list[int]:
    """The bytes of every tensor vLLM's model holds on one GPU: parameters, then buffers."""
    return [*_text(spec, tp), *_vision(spec, tp), *_buffers(spec, max_num_batched_tokens)]


def load_bytes(spec: ModelSpec, *, max_num_batched_tokens: int, tp: int = 1) -> int:
    """vLLM's "Model loading took" for this checkpoint, per GPU."""
    return sum(allocated_bytes(n) for n in tensor_bytes(spec, max_num_batched_tokens=max_num_batched_tokens, tp=tp))


def tensor_parallel_error(spec: ModelSpec, tp: int) -> str | None:
    """Why vLLM cannot split this model over ``tp`` GPUs (its words where it has them), or None:
    attention heads (ModelConfig.verify_with_parallel_config), KV heads (QKVParallelLinear: split, or
    replicated when there are fewer than GPUs), the column-split layers (divide()), and for block-FP8
    each split's 128-wide blocks (fp8_utils.validate_fp8_block_shape)."""
    if tp <= 1:
        return None
    t, v = spec.text, spec.vision
    if t.heads % tp:
        return f"Total number of attention heads ({t.heads}) must be divisible by tensor parallel size ({tp})"
    if (t.kv_heads % tp) if tp < t.kv_heads else (tp % t.kv_heads):
        return f"{t.kv_heads} KV heads cannot be split over (or replicated to) {tp} GPUs"
    for name, size in (("intermediate_size", t.intermediate), ("vision heads", v.heads),
                       ("vision intermediate_size", v.intermediate)):
        if size % tp:
            return f"{name} {size} is not divisible by tensor parallel size {tp}"
    blocked = [("intermediate_size", t.intermediate)] if spec.fp8_checkpoint else []
    if spec.fp8_checkpoint and spec.vision_quantized:
        blocked.append(("vision intermediate_size", v.intermediate))
    for name, size in blocked:
        if size // tp % FP8_BLOCK:
            return (f"{name} {size} / {tp} GPUs = {size // tp} is not divisible by weight quantization "
                    f"block = {FP8_BLOCK}")
    return None
