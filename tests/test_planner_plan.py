"""The planner's choices: the seeds' failure, card sizes for every built-in model, refusals, the CLI."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from scripts.gpu import GpuInfo, parse_gpu_query_csv
from scripts.planner import Plan, plan_for
from scripts.planner.models import BUILTIN_IDS
from scripts.planner.sizes import parse_size
from scripts.planner.vllm_plan import TOOL_CALLING_ARGS
from service.settings import ServiceSettings

GIB = 1024**3
CARDS_GB = (6, 8, 12, 16, 24)
SEEDS_MODEL = "Qwen/Qwen3-VL-4B-Instruct-FP8"
H100_CSV = Path(__file__).parent / "data" / "nvidia-smi" / "h100-linux" / "query-gpu-header.csv"


def _row(plan: Plan, name: str) -> float:
    return next(r.gib for r in plan.budget if r.name.strip() == name)


def _flag(plan: Plan, flag: str) -> str | None:
    args = plan.vllm_args
    return args[args.index(flag) + 1] if flag in args else None


# ------------------------------------------------------------------------------ the seeds' case
def test_seeds_setting_is_predicted_to_fail_like_vllm_did():
    """8 GB card, 4B-FP8, --gpu-memory-utilization 0.80 --max-model-len 4096: vLLM said
    'No available memory for the cache blocks', 'Available KV cache memory: -3.79 GiB'."""
    plan = plan_for(model=SEEDS_MODEL, gpu_memory_bytes=8 * GIB, gpu_memory_utilization=0.80, context=4096)
    assert plan.evaluated and not plan.fits
    kv = _row(plan, "KV cache")
    assert -6.0 < kv < -1.0, kv                     # negative, of the order vLLM reported
    assert plan.refusal.startswith("No available memory for the cache blocks")
    assert "max_pixels" in plan.refusal            # the lever is the dummy image, not the context
    assert plan.vllm_args == ["--gpu-memory-utilization", "0.8", "--max-model-len", "4096", *TOOL_CALLING_ARGS]
    # The user's hand-made fix (0.70, 2048) fails the same way: the context was never the problem.
    hand = plan_for(model=SEEDS_MODEL, gpu_memory_bytes=8 * GIB, gpu_memory_utilization=0.70, context=2048)
    assert not hand.fits and _row(hand, "KV cache") < kv


def test_seeds_card_gets_a_plan_that_fits():
    plan = plan_for(model=SEEDS_MODEL, gpu_memory_bytes=8 * GIB, context=4096)
    assert plan.fits and plan.profile == "16gb" and plan.context == 4096
    assert plan.kv_cache_tokens >= 4096
    assert int(_flag(plan, "--max-model-len")) == 4096
    assert json.loads(_flag(plan, "--mm-processor-kwargs"))["max_pixels"] <= ServiceSettings().max_pixels
    assert json.loads(_flag(plan, "--limit-mm-per-prompt"))["video"] == 0
    assert plan.required_free_bytes <= 8 * GIB - 800 * 1024**2  # what the desktop leaves
    # The refusal of the evaluated setting points at this plan.
    evaluated = plan_for(model=SEEDS_MODEL, gpu_memory_bytes=8 * GIB, gpu_memory_utilization=0.80, context=4096)
    assert " ".join(plan.vllm_args) in evaluated.refusal


# --------------------------------------------------------------------- every model, every card
GRID = [(m, g) for m in BUILTIN_IDS for g in CARDS_GB]


@pytest.mark.parametrize("model, gb", GRID)
@pytest.mark.parametrize("profile", ["16gb", "8gb", "auto"])
def test_a_plan_never_exceeds_the_card(model, gb, profile):
    total = gb * GIB
    plan = plan_for(model=model, profile=profile, gpu_memory_bytes=total)
    if not plan.fits:
        assert plan.refusal and "Next step" in plan.refusal or "next step" in plan.refusal.lower()
        assert not plan.vllm_args and not plan.service_env
        return
    assert plan.required_free_bytes <= total
    assert plan.refusal is None and plan.context >= 16
    assert plan.kv_cache_tokens >= plan.context     # fits => the KV cache holds the context
    if plan.profile == "16gb":
        util = float(_flag(plan, "--gpu-memory-utilization"))
        share = _row(plan, "vLLM's share")
        parts = ["weights", "activations (profiling peak)", "encoder cache", "non-torch", "CUDA graphs", "KV cache"]
        assert sum(_row(plan, p) for p in parts) == pytest.approx(share, abs=0.05)
        assert util * total + 512 * 1024**2 <= total - 800 * 1024**2   # vLLM + its context fit the free memory
        assert _row(plan, "KV cache") > _row(plan, "margin (inside KV cache)")
        assert int(_flag(plan, "--max-model-len")) == plan.context
    else:
        env = plan.service_env
        assert float(env["VLKIT_MEMORY_BUDGET_GIB"]) * GIB <= total
        assert int(env["VLKIT_MAX_MODEL_LEN"]) == plan.context
        assert _row(plan, "unused") >= 0
        assert _row(plan, "KV cache") > 0 and plan.concurrent_sequences >= 1     # one full sequence: it starts
        assert plan.kv_cache_tokens >= plan.concurrent_sequences * plan.context
        assert 8 <= int(env["VLKIT_MAX_BATCH_SIZE"]) <= 32  # from the typical requests the blocks hold
        parts = ["weights", "CUDA context", "prefill reserve", "headroom", "KV cache", "unused"]
        assert sum(_row(plan, p) for p in parts) == pytest.approx(float(env["VLKIT_MEMORY_BUDGET_GIB"]), abs=0.05)


@pytest.mark.parametrize("model", BUILTIN_IDS)
@pytest.mark.parametrize("profile", ["16gb", "8gb", "auto"])
def test_more_memory_never_gives_a_smaller_context(model, profile):
    contexts = []
    for gb in CARDS_GB + (32, 48):
        plan = plan_for(model=model, profile=profile, gpu_memory_bytes=gb * GIB)
        contexts.append(plan.context if plan.fits else 0)
    assert contexts == sorted(contexts), contexts


@pytest.mark.parametrize("gb", CARDS_GB)
def test_an_8gb_plan_is_valid_service_settings(gb, monkeypatch):
    plan = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="8gb", gpu_memory_bytes=gb * GIB)
    assert plan.fits
    for key in list(os.environ):
        if key.startswith("VLKIT_"):
            monkeypatch.delenv(key)
    for key, value in plan.service_env.items():
        monkeypatch.setenv(key, value)
    settings = ServiceSettings()                   # the service's own validation accepts every value
    assert settings.max_model_len == plan.context
    assert settings.quantization == plan.service_env["VLKIT_QUANTIZATION"]
    assert settings.memory_budget_gib * GIB <= gb * GIB


def test_small_cards_step_down_in_the_documented_order():
    big = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=16 * GIB)
    small = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=8 * GIB)
    assert _flag(big, "--kv-cache-dtype") == "auto" and "--enforce-eager" not in big.vllm_args
    assert _flag(small, "--kv-cache-dtype") == "fp8"          # fp8 KV cache before eager or smaller images
    assert big.context > small.context


def test_8b_bf16_on_a_16gb_card_goes_to_the_service_quantized_to_fp8_while_loading():
    plan = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", gpu_memory_bytes=16 * GIB)
    assert plan.fits and plan.profile == "8gb" and plan.service_env["VLKIT_QUANTIZATION"] == "fp8"


def test_nf4_only_where_neither_bf16_nor_fp8_fits():
    """4B on an 8 GiB card: fp8 at 2048 tokens, not nf4 at 4096 (nf4 loses the most); on 6 GiB only nf4 fits."""
    eight = plan_for(model="Qwen/Qwen3-VL-4B-Instruct", profile="8gb", gpu_memory_bytes=8 * GIB)
    assert eight.fits and eight.service_env["VLKIT_QUANTIZATION"] == "fp8" and eight.context == 2048
    six = plan_for(model="Qwen/Qwen3-VL-4B-Instruct", profile="8gb", gpu_memory_bytes=6 * GIB)
    assert six.fits and six.service_env["VLKIT_QUANTIZATION"] == "nf4"


def test_a_refusal_names_computed_next_steps():
    plan = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=8 * GIB)
    assert not plan.fits
    assert "No available memory for the cache blocks" in plan.refusal
    assert "--model Qwen/Qwen3-VL-4B-Instruct-FP8" in plan.refusal   # the smaller FP8 model that fits
    too_long = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=8 * GIB, context=200_000)
    assert not too_long.fits and too_long.context < 200_000
    assert f"--context {too_long.context}" in too_long.refusal
    shorter = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=8 * GIB, context=too_long.context)
    assert shorter.fits                                            # the named step works


def test_vllms_words_end_their_own_sentence():
    """vLLM's "... the estimated maximum model length is N." keeps one period before what follows."""
    too_long = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=8 * GIB, context=200_000)
    evaluated = plan_for(model=SEEDS_MODEL, gpu_memory_bytes=24 * GIB, gpu_memory_utilization=0.9)
    for plan in (too_long, evaluated):
        assert "estimated maximum model length is" in plan.refusal and ".." not in plan.refusal, plan.refusal


INSTRUCT_IDS = [m for m in BUILTIN_IDS if "Thinking" not in m]   # the Thinking twins have the same shapes


@pytest.mark.parametrize("model", INSTRUCT_IDS)
def test_every_next_step_a_refusal_names_fits_as_it_says(model):
    """Each step a refusal computes, taken as written, gives a plan that fits with the context it names:
    `--context N` (the same profile), `--profile P (..., context N)`, `--model M (profile P, context N)`.
    E.g. 4B on an 11 GiB card under 16gb at 2048 tokens: vLLM's KV cache holds 1200 tokens at
    max_pixels 802816, too few for one such image; the context that does fit is at smaller images."""
    steps = 0
    for gb in (6, 8, 10, 11, 12, 16):
        for profile in ("16gb", "8gb", "auto"):
            for context in (2048, 4096, 16384, 65536):
                asked = dict(model=model, profile=profile, gpu_memory_bytes=gb * GIB, context=context)
                plan = plan_for(**asked)
                if plan.fits:
                    continue
                where = f"{gb} GiB {profile} --context {context}: {plan.refusal}"
                named = plan.refusal.split("Next step: ", 1)[-1]
                for n in re.findall(r"a shorter context: --context (\d+)", named):
                    again = plan_for(**{**asked, "context": int(n)})
                    assert again.fits and again.context == int(n), where
                    steps += 1
                for p, n in re.findall(r"--profile (8gb|16gb) \((?:\w+ weights, )?context (\d+)\)", named):
                    again = plan_for(**{**asked, "profile": p})
                    assert again.fits and again.context == int(n), where
                    steps += 1
                for m, p, n in re.findall(r"--model (\S+) \(profile (8gb|16gb), context (\d+)\)", named):
                    again = plan_for(**{**asked, "model": m, "profile": p})
                    assert again.fits and again.context == int(n), where
                    steps += 1
    assert steps                                                    # the grid has refusals with steps


def test_fp8_checkpoints_run_in_the_8gb_profile_as_they_are():
    """The seeds' model on the seeds' card: Qwen's FP8 checkpoint, loaded as it is (no quantizing)."""
    plan = plan_for(model=SEEDS_MODEL, profile="8gb", gpu_memory_bytes=8 * GIB)
    assert plan.fits and plan.service_env["VLKIT_QUANTIZATION"] == "none" and plan.context >= 2048
    weights = next(row for row in plan.budget if row.name.strip() == "weights")
    assert "fp8" in weights.note and weights.gib > 4.88  # 4.88 GiB of tensors + what the engine was measured to hold


def test_wanted_context_is_exact_when_it_fits():
    plan = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", gpu_memory_bytes=24 * GIB, context=5000)
    assert plan.fits and plan.context == 5000 and _flag(plan, "--max-model-len") == "5000"


def test_several_gpus_plan_tensor_parallel():
    one = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=12 * GIB)
    two = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=12 * GIB, gpu_count=2)
    assert not one.fits and two.fits
    assert _flag(two, "--tensor-parallel-size") == "2"
    with pytest.raises(ValueError, match="attention heads .32. must be divisible by tensor parallel size .3."):
        plan_for(model="Qwen/Qwen3-VL-8B-Instruct", gpu_memory_bytes=12 * GIB, gpu_count=3)


def test_the_single_gpu_service_is_never_planned_over_several_gpus():
    # The 8gb service runs on one GPU: asked for two, it is refused by name, and auto picks vLLM even
    # on 8 GiB cards, where one card alone would have picked the service.
    with pytest.raises(ValueError, match="8gb profile's service runs on one GPU.*--profile 16gb"):
        plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="8gb", gpu_memory_bytes=8 * GIB, gpu_count=2)
    assert plan_for(model="Qwen/Qwen3-VL-2B-Instruct", gpu_memory_bytes=8 * GIB).profile == "8gb"
    auto = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", gpu_memory_bytes=8 * GIB, gpu_count=2)
    assert auto.fits and auto.profile == "16gb" and _flag(auto, "--tensor-parallel-size") == "2"
    assert "service runs on one GPU" in auto.auto_reason
    # Nothing fits: the next steps never name the 8gb profile, which would be refused.
    none = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", gpu_memory_bytes=4 * GIB, gpu_count=2)
    assert not none.fits and "--profile 8gb" not in none.refusal and "profile 8gb" not in none.refusal


def test_measured_gpu_from_a_real_nvidia_smi_recording():
    gpus = parse_gpu_query_csv(H100_CSV.read_text())
    plan = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", gpus=gpus)
    assert plan.fits and plan.profile == "16gb" and plan.gpu_free_bytes == gpus[0].free_bytes
    assert _row(plan, "other processes") == pytest.approx((gpus[0].total_bytes - gpus[0].free_bytes) / GIB, abs=0.01)
    # vLLM's defaults on an 80 GiB card (1024 sequences, 8192 batched tokens) are what gets evaluated.
    evaluated = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", gpus=gpus, gpu_memory_utilization=0.9, context=8192)
    assert evaluated.fits and "1024 sequences" in evaluated.notes[0]


def test_memory_held_by_other_processes_lowers_the_utilization():
    def gpu(free_gib: float) -> GpuInfo:
        return GpuInfo(index=0, name="NVIDIA GeForce RTX 4060 Ti", uuid=None, total_bytes=16 * GIB,
                       free_bytes=int(free_gib * GIB), used_bytes=int((16 - free_gib) * GIB),
                       driver_version="580.88", cuda_driver_version="13.0", compute_capability=(8, 9))
    idle = plan_for(model=SEEDS_MODEL, gpus=[gpu(15.2)])
    busy = plan_for(model=SEEDS_MODEL, gpus=[gpu(11.0)])
    assert float(_flag(busy, "--gpu-memory-utilization")) < float(_flag(idle, "--gpu-memory-utilization"))
    assert busy.required_free_bytes <= 11.0 * GIB
    # Asking for more than is free fails vLLM's start-up check, with its words.
    greedy = plan_for(model=SEEDS_MODEL, gpus=[gpu(11.0)], gpu_memory_utilization=0.9, context=4096)
    assert not greedy.fits and greedy.refusal.startswith("Free memory on device")


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * GIB), ("8GB", 8 * GIB), ("8192MiB", 8 * GIB), ("16G", 16 * GIB), ("7.5", int(7.5 * GIB)),
    (" 12 gib ", 12 * GIB)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["eight", "8XB", "-8GB", "", "100MiB"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


# ----------------------------------------------------------------------------------------- CLI
def _cli(argv, capsys):
    from scripts.cli import main
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exit_codes_and_json(capsys):
    code, out, _ = _cli(["plan", "--gpu-memory", "8GiB", "--model", SEEDS_MODEL,
                         "--gpu-memory-utilization", "0.80", "--context", "4096", "--json"], capsys)
    data = json.loads(out)
    assert code == 3 and data["fits"] is False and data["evaluated"] is True  # 2 is argparse's refusal
    assert any(r["name"].strip() == "KV cache" and r["gib"] < 0 for r in data["budget"])
    code, out, _ = _cli(["plan", "--gpu-memory", "16GB", "--model", SEEDS_MODEL, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["profile"] == "16gb" and data["vllm_args"]


def test_cli_table_shows_the_budget_and_the_command(capsys):
    code, out, _ = _cli(["plan", "--gpu-memory", "16GiB", "--model", SEEDS_MODEL, "--profile", "16gb"], capsys)
    assert code == 0
    for word in ("weights", "activations", "CUDA graphs", "encoder cache", "KV cache", "concurrent sequences",
                 "vllm serve Qwen/Qwen3-VL-4B-Instruct-FP8 --gpu-memory-utilization"):
        assert word in out


def test_cli_bad_input_is_a_clear_error(capsys):
    code, _, err = _cli(["plan", "--gpu-memory", "8GiB", "--model", "nobody/nothing"], capsys)
    assert code == 1 and "unknown model 'nobody/nothing'" in err
    code, _, err = _cli(["plan", "--gpu-memory", "8GiB", "--profile", "8gb", "--gpu-memory-utilization", "0.8"], capsys)
    assert code == 1 and "vLLM setting" in err
    with pytest.raises(SystemExit) as e:
        _cli(["plan", "--gpu-memory", "lots"], capsys)
    assert e.value.code == 2


def test_the_benchmarks_read_a_plan_that_does_not_fit_as_one():
    """bench/planned.py runs `vlkit plan --json`: a plan that does not fit (exit 3) is a plan too."""
    from bench.planned import Plan

    assert Plan(Path(SEEDS_MODEL), "16gb", "4GiB").fits is False
    assert Plan(Path(SEEDS_MODEL), "16gb", "16GiB").fits is True


@pytest.mark.parametrize("card_gib, profile", [(6, "8gb"), (8, "8gb"), (11, "8gb"), (12, "16gb"), (16, "16gb"), (24, "16gb")])
def test_auto_gives_8gb_class_cards_the_service_and_larger_ones_vllm(card_gib, profile):
    plan = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="auto", gpu_memory_bytes=card_gib * GIB)
    assert plan.fits and plan.profile == profile
    # auto never changes what the chosen profile alone would plan
    alone = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile=profile, gpu_memory_bytes=card_gib * GIB)
    assert (plan.context, plan.vllm_args, plan.service_env) == (alone.context, alone.vllm_args, alone.service_env)


# ------------------------------------------------------------------------ auto says why (issue 14)
@pytest.mark.parametrize("model, card_gib, profile, because", [
    # The measurement was of another model: the reason says which (4B-FP8's own is not measured).
    (SEEDS_MODEL, 8, "8gb", "it fits this 8 GiB card and is faster there (measured with Qwen3-VL-2B"),
    ("Qwen/Qwen3-VL-8B-Instruct", 16, "8gb", "leaves no KV cache after Qwen3-VL-8B-Instruct's 16.64 GiB of weights"),
    ("Qwen/Qwen3-VL-2B-Instruct", 8, "8gb", "--profile 16gb runs vLLM (predicted to fit, context"),
    ("Qwen/Qwen3-VL-2B-Instruct", 16, "16gb", "because vLLM fits Qwen3-VL-2B-Instruct on this 16 GiB card"),
])
def test_auto_says_in_one_line_why_its_profile_is_not_the_cards_size(model, card_gib, profile, because):
    """The profile names read like card sizes: 16gb on an 8 GiB card, or 8gb on a 16 GiB one, must say why."""
    plan = plan_for(model=model, profile="auto", gpu_memory_bytes=card_gib * GIB)
    assert plan.fits and plan.profile == profile
    reason = plan.auto_reason
    assert reason == plan.notes[0] and "\n" not in reason           # the first note, one line
    assert reason.startswith(f"auto: the {profile} profile") and because in reason
    assert reason.endswith("the profile names are engines, not card sizes")
    alone = plan_for(model=model, profile=profile, gpu_memory_bytes=card_gib * GIB)
    assert alone.auto_reason is None and not any(n.startswith("auto") for n in alone.notes)


def test_auto_names_both_shortfalls_when_neither_profile_fits():
    plan = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="auto", gpu_memory_bytes=6 * GIB)
    assert not plan.fits and plan.auto_reason.startswith("auto: neither profile fits: vLLM's")
    assert "and vlkit's service needs" in plan.auto_reason
    assert plan.refusal.startswith("vLLM (16gb): ") and "vlkit's service (8gb) does not fit either" in plan.refusal


def test_cli_prints_auto_s_reason_first_and_in_json(capsys):
    code, out, _ = _cli(["plan", "--gpu-memory", "8GiB", "--model", SEEDS_MODEL, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["profile"] == "8gb"
    assert data["auto_reason"] == data["notes"][0] and "faster there" in data["auto_reason"]
    code, out, _ = _cli(["plan", "--gpu-memory", "8GiB", "--model", SEEDS_MODEL], capsys)
    assert code == 0 and "is faster there" in " ".join(out.split())


# ------------------------------------------------------- messages in the words the user typed
def test_under_make_messages_name_make_variables(monkeypatch):
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")
    too_long = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=8 * GIB, context=200_000)
    assert f"a shorter context: CONTEXT={too_long.context}" in too_long.refusal and "--context" not in too_long.refusal
    big = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=8 * GIB)
    assert "MODEL=Qwen/Qwen3-VL-4B-Instruct-FP8" in big.refusal and "--model" not in big.refusal
    small = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="auto", gpu_memory_bytes=8 * GIB)
    assert "PROFILE=16gb runs vLLM" in small.auto_reason
    evaluated = plan_for(model=SEEDS_MODEL, gpu_memory_bytes=8 * GIB, gpu_memory_utilization=0.80, context=4096)
    assert "drop ARGS=--gpu-memory-utilization)" in evaluated.refusal
    with pytest.raises(ValueError, match="GPU_MEMORY=8GiB"):
        plan_for(model=SEEDS_MODEL, gpus=[])
    with pytest.raises(ValueError, match="CONTEXT=300000 exceeds"):
        plan_for(model=SEEDS_MODEL, gpu_memory_bytes=8 * GIB, context=300_000)


def test_without_make_messages_name_flags():
    too_long = plan_for(model=SEEDS_MODEL, profile="16gb", gpu_memory_bytes=8 * GIB, context=200_000)
    assert f"a shorter context: --context {too_long.context}" in too_long.refusal
    with pytest.raises(ValueError, match=r"--gpu-memory \(e.g. --gpu-memory 8GiB\)"):
        plan_for(model=SEEDS_MODEL, gpus=[])
