"""--max-num-seqs / --max-num-batched-tokens from the KV cache and their cost; tensor-parallel plans."""
from __future__ import annotations

import pytest

from scripts.planner import plan_for
from scripts.planner.card import card_for
from scripts.planner.models import BUILTIN_IDS, resolve_model
from scripts.planner.targets import min_useful_context
from scripts.planner.vllm_batch import SEQ_STEPS, THROUGHPUT_SHARE
from scripts.planner.vllm_memory import predict
from scripts.planner.vllm_plan import knobs_from_args

GIB, MIB = 1024**3, 1024**2


def _flag(plan, flag):
    return int(plan.vllm_args[plan.vllm_args.index(flag) + 1])


def _row(plan, name):
    return next(r for r in plan.budget if r.name.strip() == name)


def _budget(plan, **change):
    spec = resolve_model(plan.model)
    card = card_for(None, plan.gpu_total_bytes, plan.gpu_count)
    knobs = knobs_from_args(plan.vllm_args, spec)
    return predict(spec, knobs.__class__(**{**knobs.__dict__, **change}), total=card.total, free=card.free)


@pytest.mark.parametrize("model", BUILTIN_IDS)
@pytest.mark.parametrize("gb", [8, 12, 16, 24, 48])
def test_sequences_are_what_the_kv_cache_holds_and_cost_at_most_their_share(model, gb):
    plan = plan_for(model=model, profile="16gb", gpu_memory_bytes=gb * GIB)
    if not plan.fits:
        return
    seqs, tokens = _flag(plan, "--max-num-seqs"), _flag(plan, "--max-num-batched-tokens")
    typical = min_useful_context(resolve_model(model), 1003520)
    assert seqs in SEQ_STEPS and tokens >= seqs
    assert seqs == 8 or seqs * typical <= plan.kv_cache_tokens      # more only where the KV cache holds them
    floor = _budget(plan, max_num_seqs=8, max_num_batched_tokens=2048)
    chosen = _budget(plan)
    assert chosen.kv_tokens == plan.kv_cache_tokens                  # the cost is in the plan's prediction
    assert floor.kv_available - chosen.kv_available <= THROUGHPUT_SHARE * floor.kv_available + 1
    assert _row(plan, "--max-num-seqs").gib == seqs and _row(plan, "--max-num-batched-tokens").gib == tokens


def test_an_8_gib_card_keeps_8_sequences_and_a_16_gib_card_runs_32_image_requests_at_once():
    """The measured hint: 2B on an emulated 16 GiB card, 32 concurrent image requests, 1888 tok/s at 32
    sequences against 1263 at 8: the plan must not cap it at 8 there; the 8 GiB card's KV cache holds 8."""
    small = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="16gb", gpu_memory_bytes=8 * GIB)
    big = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="16gb", gpu_memory_bytes=16 * GIB)
    assert _flag(small, "--max-num-seqs") == 8 and _flag(small, "--max-num-batched-tokens") == 2048
    assert _flag(big, "--max-num-seqs") >= 32 and big.context == 32768


def test_more_sequences_cost_memory_in_the_prediction():
    """The sampler's rows x vocab and the extra CUDA graphs come out of the KV cache."""
    plan = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="16gb", gpu_memory_bytes=16 * GIB)
    kv = [_budget(plan, max_num_seqs=s).kv_available for s in (8, 32, 128)]
    assert kv[0] > kv[1] > kv[2]
    b = _budget(plan, max_num_seqs=128)
    assert b.sampler == 128 * 151936 * 32 and b.graphs > _budget(plan, max_num_seqs=8).graphs


def test_a_context_the_kv_cache_barely_holds_is_not_traded_for_sequences():
    plan = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="16gb", gpu_memory_bytes=8 * GIB)
    assert plan.context < 16384 and _flag(plan, "--max-num-seqs") == 8


@pytest.mark.parametrize("model", BUILTIN_IDS)
def test_more_memory_never_fewer_sequences(model):
    seqs = []
    for gb in (8, 12, 16, 24, 48):
        plan = plan_for(model=model, profile="16gb", gpu_memory_bytes=gb * GIB)
        seqs.append(_flag(plan, "--max-num-seqs") if plan.fits else 0)
    assert seqs == sorted(seqs), seqs


# ---------------------------------------------------------------------------- tensor parallel
def test_8b_on_two_16_gib_cards_splits_per_rank():
    """Per GPU: half the split layers + the whole rotary cache and DeepStack buffers, half the KV heads
    (4 of 8), NCCL's buffers beside vLLM's share."""
    one = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=16 * GIB)
    two = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=16 * GIB, gpu_count=2)
    assert not one.fits and two.fits and _flag(two, "--tensor-parallel-size") == 2
    b = _budget(two)
    assert 8.2 < b.weights / GIB < 8.8                        # not 16.64 / 2 = 8.32 exactly
    assert b.kv_bytes_per_token == 2 * 36 * 4 * 128 * 2       # 4 KV heads a rank
    assert _row(two, "CUDA context (vLLM)").gib == pytest.approx(0.75)   # 512 MiB + NCCL 256 MiB
    assert two.required_free_bytes == b.requested + 768 * MIB + 192 * MIB


def test_tensor_parallel_activations_split_but_the_residual_stream_does_not():
    spec = resolve_model("Qwen/Qwen3-VL-8B-Instruct")
    from scripts.planner.model_facts import decoder_bytes_per_token, vision_bytes_per_patch

    assert decoder_bytes_per_token(spec, 2) > decoder_bytes_per_token(spec) / 2
    assert vision_bytes_per_patch(spec, 2) > vision_bytes_per_patch(spec) / 2
    assert decoder_bytes_per_token(spec, 2) < decoder_bytes_per_token(spec)
