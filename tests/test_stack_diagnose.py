"""Failure output -> cause and fix. The inputs are the messages the real tools print (the vLLM lines
are the ones in the user's notes in shared/seeds; the Docker line is what this machine's engine
answers to a GPU request)."""
from __future__ import annotations

import pytest

from scripts import images
from scripts.stack.diagnose import diagnose

VLLM_KV = ("ERROR 11-02 14:03:11 [core.py:708] ValueError: No available memory for the cache blocks. "
           "Try increasing `gpu_memory_utilization` when initializing the engine.\n"
           "INFO 11-02 14:03:10 [gpu_worker.py:276] Available KV cache memory: -3.79 GiB")
TORCH_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.17 GiB. GPU 0 has a total "
             "capacity of 7.96 GiB of which 312.00 MiB is free.")
NO_GPU_RUNTIME = ('Error response from daemon: could not select device driver "nvidia" with capabilities: '
                  "[[gpu]]")
OLD_DRIVER = ("nvidia-container-cli: requirement error: unsatisfied condition: cuda>=13.0, please update "
              "your driver to a newer version, or use an earlier cuda container: unknown")
WSL_LIBCUDA = ("ImportError: libcuda.so.1: cannot open shared object file: No such file or directory")
RUNTIME_DRIVER = "RuntimeError: CUDA driver version is insufficient for CUDA runtime version"
# vLLM 0.27.0's own messages (v1/worker/gpu/buffer_utils.py UvaBuffer, v1/worker/utils.py request_memory)
# as its engine core logs them; the UVA traceback as vLLM issue 54652 shows it.
VLLM_UVA = ('(EngineCore_DP0 pid=212) File ".../vllm/v1/worker/gpu/buffer_utils.py", line 47, in __init__\n'
            '(EngineCore_DP0 pid=212)     raise RuntimeError("UVA is not available")\n'
            "(EngineCore_DP0 pid=212) RuntimeError: UVA is not available")
VLLM_FREE = ("(EngineCore_DP0 pid=212) ValueError: Free memory on device cuda:0 (6.12/7.96 GiB) on startup is less "
             "than desired GPU memory utilization (0.81, 6.45 GiB). Decrease GPU memory utilization or reduce GPU "
             "memory used by other processes.")


@pytest.mark.parametrize("text, words", [
    (VLLM_KV, ["KV cache", "Close other GPU programs"]),
    (TORCH_OOM, ["out of memory", "smaller model"]),
    (NO_GPU_RUNTIME, ["NVIDIA Container Toolkit", "WSL 2 engine"]),
    (OLD_DRIVER, ["driver", images.MIN_DRIVER[images.SERVICE_CUDA]["windows"]]),
    (RUNTIME_DRIVER, ["driver is older"]),
    (WSL_LIBCUDA, ["/usr/lib/wsl/lib", "wsl --shutdown"]),
    (VLLM_UVA, ["pinned host memory", "VLLM_USE_V2_MODEL_RUNNER=0", "vlkit up"]),
    (VLLM_FREE, ["other programs took GPU memory", "Windows desktop", "vlkit up"]),
    # service/engine/loading.py's own words for a model path with no checkpoint in it
    ("error: model '/models/tiny' is neither a checkpoint directory nor a hub id like 'Qwen/Qwen3-VL-2B-Instruct'",
     ["no checkpoint at the model path", "config.json", "vlkit doctor"]),
])
def test_known_failures_name_their_fix(text, words):
    found = diagnose("some unrelated line\n" + text + "\nanother line")
    assert found, text
    joined = " ".join(d.cause + " " + d.fix for d in found[:1])
    for word in words:
        assert word in joined


def test_the_seeds_negative_kv_cache_is_not_mistaken_for_an_oom():
    (first, *_) = diagnose(VLLM_KV)
    assert "KV cache" in first.cause and "out of memory" not in first.cause


def test_vllms_free_memory_check_is_not_read_as_a_kv_cache_or_oom_failure():
    assert [d.cause.split(":")[0] for d in diagnose(VLLM_FREE)] == [
        "Between planning and vLLM's start other programs took GPU memory"]


def test_unknown_output_gives_no_made_up_cause():
    assert diagnose("INFO: Uvicorn running on http://0.0.0.0:8000\nall good") == []


@pytest.mark.parametrize("text", [
    # moby's own words for a bind mount it cannot make (the cache is a bind mount, created if missing)
    "Error response from daemon: error while creating mount source path '/mnt/d/hf/hub': mkdir /mnt/d/hf: "
    "permission denied",
    'Error response from daemon: invalid mount config for type "bind": bind source path does not exist: '
    "/mnt/d/hf/hub",
])
def test_a_cache_mount_failure_names_the_cache_folder_in_use(text, monkeypatch, tmp_path):
    monkeypatch.setenv("VLKIT_HF_CACHE", str(tmp_path / "hub"))
    (first, *_) = diagnose(text)
    assert "Hugging Face cache" in first.cause and str(tmp_path / "hub") in first.fix


def test_a_failed_starts_fixes_repeat_the_users_own_command(capsys, monkeypatch):
    """`make up MODEL=Qwen/Qwen3-VL-4B-Instruct-FP8 CONTEXT=4096` ended in vLLM's negative KV cache:
    'run `make up` again' would start the default model instead (another download). The fixes printed
    after the logs name the model and context the user gave."""
    from types import SimpleNamespace

    from scripts.cli import build_parser
    from scripts.stack import up

    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")
    model = "Qwen/Qwen3-VL-4B-Instruct-FP8"
    args = build_parser().parse_args(["up", "--model", model, "--context", "4096"])
    up._print_failure(SimpleNamespace(service="vllm-16gb"), VLLM_KV, None, up.users_command(args, model, None))
    out = capsys.readouterr().out
    assert f"then run `make up MODEL={model} CONTEXT=4096` again" in out, out
    assert f"`make plan MODEL={model} CONTEXT=4096` to see the budget" in out, out
    assert f"`make up PROFILE=8gb MODEL={model} CONTEXT=4096` for the service" in out, out
