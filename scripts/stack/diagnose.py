"""Turn a failed start's output (container logs, docker's own error) into the cause and the fix.

Patterns are the messages the real tools print (vLLM, PyTorch, the NVIDIA Container Toolkit, Docker,
Docker Desktop on WSL2); each maps to what to do next, in the user's terms.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from scripts import images
from scripts.doctor.docker import DESKTOP_GPU_FIX, TOOLKIT_FIX
from scripts.hf_cache import hub_cache
from scripts.usage import command


@dataclass(frozen=True)
class Diagnosis:
    cause: str
    fix: str


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    cause: str
    fix: str


def _rule(regex: str, cause: str, fix: str) -> _Rule:
    return _Rule(re.compile(regex, re.IGNORECASE), cause, fix)


# The user's command for a target, with changes: `again("up", profile="8gb")`.
Again = Callable[..., str]


def _rules(again: Again) -> tuple[_Rule, ...]:
    """The rules, their fixes in the user's terms (make variables under make, flags otherwise), the
    commands to run again being the user's own (`again`), so they keep its MODEL, CONTEXT, ..."""
    up, plan = (f"`{again(t)}`" for t in ("up", "plan"))
    doctor = f"`{command('doctor')}`"
    return (
        # vLLM >= 0.25 under WSL2: its V2 model runner needs pinned host memory, which vLLM turns off there.
        _rule(r"UVA is not available",
              "vLLM's V2 model runner (its default since 0.25) allocates UVA buffers, which need pinned host "
              "memory, and vLLM turns pinned memory off under WSL2 (docs/PLANNER.md, \"WSL2 and vLLM's model runner\").",
              f"Start it with {up}: it writes VLLM_USE_V2_MODEL_RUNNER=0 (vLLM's V1 runner) to vlkit.env. "
              "Starting vLLM yourself: set VLLM_USE_V2_MODEL_RUNNER=0, or VLLM_WSL2_ENABLE_PIN_MEMORY=1 (WSL kernel "
              "4.19.121 or newer) to keep V2. If you set VLLM_USE_V2_MODEL_RUNNER=1 in your shell, unset it."),
        # vLLM's start-up check, after its CUDA context: the plan's share must still be free.
        _rule(r"Free memory on device .* is less than desired GPU memory utilization",
              "Between planning and vLLM's start other programs took GPU memory: the plan's "
              "--gpu-memory-utilization share is no longer free (under WSL2 the Windows desktop, browsers and "
              "games use the same card, and their use changes).",
              f"Close GPU programs (Windows: browsers with hardware acceleration, games, video), then {up} again: "
              f"it plans from the memory free at that moment. {plan} shows what the plan needs free."),
        _rule(r"No available memory for the cache blocks|Available KV cache memory: -|"
              r"KV cache memory .*(negative|insufficient)|is larger than the available KV cache memory",
              "vLLM found no room for its KV cache: weights + profiling activations + CUDA graphs used "
              "everything --gpu-memory-utilization allows. The plan assumed more free VRAM than there was "
              "at start-up (another program holds GPU memory, or the card is smaller than planned).",
              "Close other GPU programs (browsers, games, other containers; `nvidia-smi` lists them), then run "
              f"{up} again: the plan is recomputed from the memory free now. Or {plan} to see the "
              f"budget, and `{again('up', profile='8gb')}` for the service that needs no KV cache reservation."),
        _rule(r"CUDA out of memory|torch\.OutOfMemoryError|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
              r"cudaErrorMemoryAllocation",
              "The GPU ran out of memory while the model was loading or warming up.",
              "Free GPU memory (close other GPU programs; under WSL2 the Windows desktop uses VRAM too), then "
              f"{up} again; or pick a smaller model / shorter context: `{command('plan', model='...')}` shows what fits."),
        _rule(r"could not select device driver .*capabilities: \[\[gpu\]\]|could not select device driver",
              "Docker has no GPU runtime: the NVIDIA Container Toolkit is missing (Docker Engine), or Docker "
              "Desktop does not run on its WSL 2 engine.",
              f"Docker Engine inside WSL/Linux: {TOOLKIT_FIX}. {DESKTOP_GPU_FIX}. Check with {doctor}."),
        _rule(r"unsatisfied condition: cuda>=|CUDA driver version is insufficient for CUDA runtime version|"
              r"cudaErrorInsufficientDriver|The NVIDIA driver on your system is too old",
              "The NVIDIA driver is older than the CUDA this image needs "
              f"(8gb: CUDA {images.SERVICE_CUDA}, 16gb: CUDA {images.VLLM_CUDA}).",
              f"Update the NVIDIA driver to {images.MIN_DRIVER[images.SERVICE_CUDA]['linux']} or newer "
              f"(Windows/WSL2: install {images.MIN_DRIVER[images.SERVICE_CUDA]['windows']} or newer on Windows; "
              f"do not install a driver inside WSL), then `wsl --shutdown` and {up}."),
        _rule(r"libcuda\.so[.0-9]*: cannot open shared object file|/usr/lib/wsl/lib|"
              r"Found no NVIDIA driver on your system|failed to initialize NVML: (Driver Not Loaded|"
              r"Unknown Error)|nvidia-container-cli: initialization error",
              "The container cannot reach the NVIDIA driver. Under WSL2 the driver lives in Windows and is "
              "exposed through /usr/lib/wsl/lib; it is not mounted into the container.",
              "WSL2: do not install a Linux NVIDIA driver in the distro; use Docker Desktop (WSL2 backend) or "
              "nvidia-container-toolkit >= 1.14 in the distro, check `nvidia-smi` works in WSL, then "
              f"`wsl --shutdown` (`{command('wsl-restart')}` runs it) and {up}. {doctor} checks each step."),
        _rule(r"no kernel image is available for execution on the device|sm_\d+ is not compatible",
              "This GPU is older than the image's CUDA build supports (Turing / RTX 20xx or newer needed).",
              f"Use a Turing-or-newer NVIDIA GPU; {doctor} shows the card's compute capability."),
        _rule(r"Cannot connect to the Docker daemon|docker daemon is not running|error during connect",
              "Docker is not running.",
              "Start Docker Desktop (Windows) or the Docker service (`sudo service docker start`), then retry."),
        _rule(r"port is already allocated|address already in use|bind: address already in use",
              "The port is taken by another program.",
              f"Pick another one: `{again('up', port=8001)}` (or stop what uses it; `{command('down')}` if it is vlkit)."),
        _rule(r"LocalEntryNotFoundError|outgoing traffic has been disabled|HF_HUB_OFFLINE|"
              r"We couldn't connect to 'https://huggingface.co'|Cannot find an appropriate cached snapshot",
              "The model is not (completely) in the Hugging Face cache the containers read.",
              f"Download it first: `{command('download', model='org/name')}` (it resumes partial downloads), then {up}."),
        _rule(r"is neither a checkpoint directory nor a hub id",
              "The service found no checkpoint at the model path it was given (its config.json and weights).",
              f"Check that MODEL= names the folder that holds config.json and the weights; {doctor} checks it, "
              f"then {up}."),
        _rule(r"(Permission denied|No such file or directory): '/models/",
              f"The container's user (uid {images.SERVICE_UID}) cannot read the model folder mounted at /models.",
              "Make it readable: `chmod -R a+rX <the folder>`, then "
              f"{up} again (save_pretrained writes weights readable by their owner only)."),
        # moby's words for a bind mount it cannot make: the cache, or a local model folder.
        _rule(r"error while creating mount source path|bind source path does not exist|error while mounting volume",
              "Docker could not mount a host folder into the container: the Hugging Face cache or the model folder.",
              f"Check that the folder the error names exists and that Docker can reach it (the cache in use is "
              f"{hub_cache()}; put it elsewhere with `export VLKIT_HF_CACHE=/path`), then {up}."),
    )


def diagnose(text: str, again: Again = command) -> list[Diagnosis]:
    """Every known cause found in `text` (logs or error output), most specific first, no duplicates;
    `again` writes the commands the fixes say to run (default: the bare target)."""
    found: list[Diagnosis] = []
    for rule in _rules(again):
        if rule.pattern.search(text):
            d = Diagnosis(rule.cause, rule.fix)
            if d not in found:
                found.append(d)
    return found
