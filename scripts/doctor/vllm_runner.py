"""The 16gb profile's vLLM model runner on this platform: WSL2 needs vLLM's V1 runner (or pinned memory)."""
from __future__ import annotations

import os

from scripts import images
from scripts.doctor.model import Check, fail, ok
from scripts.usage import command


def vllm_runner_check(facts, profile: str, environ: dict[str, str] | None = None) -> Check | None:
    """WSL2 only (elsewhere vLLM's default runner starts): what `make up` hands vLLM, and a shell
    setting that would bring back the crash at start-up."""
    if profile == "8gb" or not facts.platform.is_wsl:
        return None
    env = images.vllm_env(os.environ if environ is None else environ)
    v2 = env.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true")
    pinned = env.get("VLLM_WSL2_ENABLE_PIN_MEMORY", "") not in ("", "0")
    if v2 and not pinned:
        return fail("vllm-runner", "VLLM_USE_V2_MODEL_RUNNER=1 in this shell: under WSL2 vLLM's V2 runner dies at "
                    "start-up with \"UVA is not available\" (it needs pinned memory, which vLLM turns off here)",
                    f"`unset VLLM_USE_V2_MODEL_RUNNER` (`{command('up')}` then starts vLLM's V1 runner), or also set "
                    "VLLM_WSL2_ENABLE_PIN_MEMORY=1", blocking=profile == "16gb")
    if v2:
        return ok("vllm-runner", "vLLM's V2 runner with pinned memory (VLLM_WSL2_ENABLE_PIN_MEMORY=1, set in this shell)")
    return ok("vllm-runner", f"WSL2: `{command('up')}` starts vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0); "
              "its default V2 runner needs pinned memory, which vLLM turns off under WSL2")
