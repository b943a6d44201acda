"""The weights vLLM reports ("Model loading took"), as the planner predicts them.

Two kinds of real figures: the bytes of vLLM 0.27.0's own Qwen3-VL modules, built with its
EngineArgs/initialize_model on the meta device (parameters, registered buffers and the DeepStack
tensors; recorded here, docs/PLANNER.md says how), and what vLLM 0.24.0 logged on the GPU machine
(tests/data/vllm_calibration.json), which adds torch's allocator rounding.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.planner.models import BUILTIN, resolve_model
from scripts.planner.vllm_weights import allocated_bytes, load_bytes, tensor_bytes, tensor_parallel_error

GIB, MIB = 1024**3, 1024**2
CALIBRATION = json.loads((Path(__file__).parent / "data" / "vllm_calibration.json").read_text())

# (model, vision tower FP8, max_num_batched_tokens) -> bytes of vLLM 0.27.0's module on one GPU
VLLM_027_MODULE_BYTES = {
    ("Qwen/Qwen3-VL-2B-Instruct", False, 2048): 4_549_190_080,
    ("Qwen/Qwen3-VL-2B-Instruct", False, 8192): 4_624_687_552,    # DeepStack buffers grow with the batch
    ("Qwen/Qwen3-VL-4B-Instruct", False, 2048): 9_176_049_216,
    ("Qwen/Qwen3-VL-8B-Instruct", False, 2048): 17_853_604_896,    # untied lm_head
    ("Qwen/Qwen3-VL-4B-Instruct-FP8", False, 2048): 5_543_620_704,  # Qwen's layout: tower in bf16
    ("Qwen/Qwen3-VL-4B-Instruct-FP8", True, 2048): 5_132_679_264,   # modules_to_not_convert ["visual", "lm_head"]
    ("Qwen/Qwen3-VL-8B-Instruct-FP8", False, 2048): 10_909_533_504,
}


def _spec(model: str, vision_quantized: bool = False):
    return resolve_model(model).model_copy(update={"vision_quantized": vision_quantized})


@pytest.mark.parametrize("model, vision_fp8, tokens", list(VLLM_027_MODULE_BYTES))
def test_tensors_are_those_of_vllms_own_module(model, vision_fp8, tokens):
    spec = _spec(model, vision_fp8)
    assert sum(tensor_bytes(spec, max_num_batched_tokens=tokens)) == VLLM_027_MODULE_BYTES[model, vision_fp8, tokens]


@pytest.mark.parametrize("case", [c for c in CALIBRATION["cases"] if "weights_gib" in c], ids=lambda c: c["name"])
def test_load_bytes_are_what_vllm_logged(case):
    """vLLM prints two decimals; the FP8 eager run logged 0.04 GiB more than its twin with vLLM's
    defaults (4.88 against 4.85, same checkpoint), so FP8 is held to 0.05."""
    spec = _spec(case["model"], case.get("vision_quantized", False))
    args = case["args"]
    tokens = int(args[args.index("--max-num-batched-tokens") + 1])
    predicted = load_bytes(spec, max_num_batched_tokens=tokens) / GIB
    assert predicted == pytest.approx(case["weights_gib"], abs=0.05 if spec.fp8_checkpoint else 0.006)


def test_the_rounding_is_what_makes_4b_heavier_than_its_tensors():
    """4B's gate_up (95 MiB) and down (47.5 MiB) projections each take a whole 2 MiB-rounded segment:
    36 layers x 1.5 MiB, the 0.05 GiB between vLLM's 8.60 and the 8.55 its tensors hold."""
    spec = BUILTIN["qwen/qwen3-vl-4b-instruct"]
    raw = sum(tensor_bytes(spec, max_num_batched_tokens=2048))
    assert (load_bytes(spec, max_num_batched_tokens=2048) - raw) / MIB == pytest.approx(36 * 1.5 + 0.125, abs=0.5)


@pytest.mark.parametrize("mib, counted", [
    (100 / MIB, 512 / MIB),   # everything is at least 512 bytes
    (8, 8),               # under 10 MiB: split off a shared 20 MiB segment, exactly
    (12.5, 12.5),         # 14 MiB segment, 1.5 MiB left over: split
    (13, 14),             # 1 MiB left is not more than 1 MiB: the block keeps it
    (15, 16),
    (30, 30),             # already 2 MiB-aligned
    (47.5, 48),           # 20 MiB and more: never split while vLLM loads (max_split_size_mb=20)
    (95, 96),
])
def test_allocator_rounding(mib, counted):
    assert allocated_bytes(int(mib * MIB)) == int(counted * MIB)


def test_tensor_parallel_splits_the_layers_not_the_buffers():
    """Per GPU with tp=2: the split layers halve; the rotary cache (256 MiB), the DeepStack buffers,
    norms and row-parallel biases stay whole on every rank."""
    spec = BUILTIN["qwen/qwen3-vl-8b-instruct"]
    one = sum(tensor_bytes(spec, max_num_batched_tokens=2048))
    two = sum(tensor_bytes(spec, max_num_batched_tokens=2048, tp=2))
    whole = 4 * spec.text.max_position * spec.text.head_dim * 2 + 3 * 2048 * spec.text.hidden * 2
    assert two == pytest.approx((one - whole) / 2 + whole, rel=0.01)
    assert two - one / 2 > 128 * MIB            # not a plain halving: half the rotary cache more


@pytest.mark.parametrize("model, tp, why", [
    ("Qwen/Qwen3-VL-8B-Instruct", 3, "attention heads (32) must be divisible by tensor parallel size (3)"),
    ("Qwen/Qwen3-VL-2B-Instruct", 32, "attention heads (16) must be divisible"),
    ("Qwen/Qwen3-VL-4B-Instruct-FP8", 8, "9728 / 8 GPUs = 1216 is not divisible by weight quantization block"),
])
def test_tensor_parallel_refuses_what_vllm_refuses(model, tp, why):
    assert why in tensor_parallel_error(resolve_model(model), tp)


@pytest.mark.parametrize("model", ["Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct-FP8", "Qwen/Qwen3-VL-8B-Instruct"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_accepts_what_vllm_splits(model, tp):
    assert tensor_parallel_error(resolve_model(model), tp) is None


def test_more_gpus_than_kv_heads_replicate_them():
    """16 GPUs over 8 KV heads: each rank holds one KV head (vLLM replicates), not half of one."""
    spec = BUILTIN["qwen/qwen3-vl-8b-instruct"].model_copy(deep=True)
    spec.text.heads = 32
    assert tensor_parallel_error(spec, 16) is None
    assert spec.kv_bytes_per_token(2, 16) == spec.kv_bytes_per_token(2, 8)
    assert tensor_parallel_error(spec, 12) is not None
