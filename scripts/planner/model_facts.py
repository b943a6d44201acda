"""What a Qwen3-VL model's shapes imply for memory, whichever engine serves it.

Image tokens per image size (the processor's rule), and the activation and output bytes of the
vision tower and the decoder per patch or token. Both profiles' estimates build on these:
vllm_memory.py for vLLM's profiling run, service_memory.py for the service's prefill.
"""
from __future__ import annotations

import math

from .models import ModelSpec


def max_image_tokens(spec: ModelSpec, max_pixels: int) -> int:
    """Merged tokens of the largest image the processor makes under ``max_pixels``: vLLM's
    Qwen2VLProcessingInfo.get_image_size_with_most_features + get_num_image_tokens (the count of
    (patch x merge)-pixel squares that fit, factored to an aspect ratio of at most 200)."""
    unit = spec.vision.patch * spec.vision.merge
    max_seq_len = max_pixels // (unit * unit)
    for seq_len in range(max_seq_len, 0, -1):
        d = math.isqrt(seq_len)
        while seq_len % d:
            d -= 1
        if (seq_len // d) / d <= 200:
            return seq_len
    return 1


def vision_bytes_per_patch(spec: ModelSpec, tp: int = 1) -> int:
    """Live bytes per vision patch at the tower's peak (bf16 activations), per GPU when ``tp`` GPUs
    split the tower (heads and MLP columns split; the residual stream is whole on every rank).

    Input pixels arrive as fp32 and get a bf16 copy (3 bytes x 2 + 2 bytes each); in an attention
    block the residual, the norm and the projection's output (whole) and qkv (3), the rotated q/k
    (2), v made contiguous, the attention output and its re-layout (split) live together: ~13 x
    hidden; the MLP needs 3 x hidden + 2 x intermediate. Position embeddings add one hidden."""
    v = spec.vision
    pixels = v.in_channels * v.temporal_patch * v.patch**2
    block = max(3 * v.hidden + 10 * v.hidden // tp, 3 * v.hidden + 2 * v.intermediate // tp)
    return pixels * (4 + 2) + 2 * (block + v.hidden)


def encoder_output_bytes(spec: ModelSpec, tokens: int) -> int:
    """Merged tokens x out_hidden x (1 + deepstack slices), bf16: what the tower hands the decoder."""
    return tokens * spec.vision.out_hidden * (1 + spec.vision.deepstack) * 2


def decoder_bytes_per_token(spec: ModelSpec, tp: int = 1) -> int:
    """Residual, norm and output (whole on every rank), q/k/v, attention output, gate_up
    (2 x intermediate) and the activation (split across ``tp`` GPUs), bf16."""
    t = spec.text
    qkv = (t.heads + 2 * t.kv_heads) * t.head_dim
    return 2 * (3 * t.hidden + (qkv + t.heads * t.head_dim + 3 * t.intermediate) // tp)
