"""Architecture shapes of the real Qwen3-VL Instruct models, and a tiny one for tests.

Plain dicts in the layout of the checkpoints' ``config.json`` (no torch import), so the benchmark can
build a random-weight model of a real size without any download:
``service.tiny_model.build_checkpoint(out_dir, shape="2b")``.

The figures are those of the published Qwen/Qwen3-VL-{2B,4B,8B}-Instruct configs.
"""
from __future__ import annotations

import copy

# Special tokens of Qwen2/Qwen3 tokenizers, in id order from QWEN_SPECIAL_BASE_ID (151643) on.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Added but not "special" (they stay in decoded text), again in Qwen's id order.
QWEN_PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN_SPECIAL_BASE_ID = 151643
QWEN_VOCAB_SIZE = 151936

_VISION_COMMON = {
    "model_type": "qwen3_vl_vision",
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "initializer_range": 0.02,
}
_TEXT_COMMON = {
    "model_type": "qwen3_vl_text",
    "vocab_size": QWEN_VOCAB_SIZE,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
    "initializer_range": 0.02,
}

SHAPES: dict[str, dict] = {
    "2b": {
        "tie_word_embeddings": True,
        "text_config": {**_TEXT_COMMON, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "num_key_value_heads": 8},
        "vision_config": {**_VISION_COMMON, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]},
    },
    "4b": {
        "tie_word_embeddings": True,
        "text_config": {**_TEXT_COMMON, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8},
        "vision_config": {**_VISION_COMMON, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]},
    },
    "8b": {
        "tie_word_embeddings": False,
        "text_config": {**_TEXT_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8},
        "vision_config": {**_VISION_COMMON, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "num_heads": 16, "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]},
    },
    # Tests/CI: ~0.3 M parameters. mrope_section sums to head_dim/2; num_position_embeddings is a square.
    # A wide initializer makes random logits peaky, so greedy margins stay far above float noise
    # (batch == single holds by token ids, not by luck). In the FP8 layout (128x128 scale blocks),
    # gate/up (256 rows) span two whole row blocks and fuse, q/k/v (64/32/32 rows) and the 64 columns
    # of hidden size fill part of one: both cases the loader and the fusion meet.
    "tiny": {
        "tie_word_embeddings": False,
        "text_config": {**_TEXT_COMMON, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "max_position_embeddings": 32768, "initializer_range": 0.2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
        "vision_config": {**_VISION_COMMON, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "num_position_embeddings": 256, "deepstack_visual_indexes": [0]},
    },
}


def shape(name: str) -> dict:
    """A deep copy of one shape (``2b``, ``4b``, ``8b`` or ``tiny``)."""
    try:
        return copy.deepcopy(SHAPES[name.lower()])
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}") from None
