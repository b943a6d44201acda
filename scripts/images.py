"""One place for the facts about vlkit's container images (tags, pinned versions, CUDA, drivers).

The Dockerfiles take these as build args (`vlkit build` passes them), the doctor compares the host
driver with MIN_DRIVER, and the planner reads VLLM_VERSION for the vLLM accounting it models.
"""
from __future__ import annotations

import os
from typing import Literal

from service.version import vlkit_version

VLKIT_VERSION = vlkit_version()

# --- 16gb profile: the official vLLM OpenAI server image -------------------------------------------
# Pinned: the planner models this version's memory accounting and its flags are checked against this
# version's own argument parser in the tests. vLLM 0.27.x pins torch 2.13.0 (the torch CI has here).
VLLM_VERSION = "0.27.0"
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
# vLLM's images are built on CUDA 13.0 since 0.2x (its PyPI wheels too, see docs/DOCKER.md).
VLLM_CUDA = "13.0"
# vLLM's model runner, on every platform: the V1 runner. From 0.25 vLLM runs Qwen3-VL on its V2 model
# runner, whose UVA buffers need pinned host memory, which vLLM turns off under WSL2 unless
# VLLM_WSL2_ENABLE_PIN_MEMORY=1 (platforms/cuda.py is_pin_memory_available): every default start
# there dies with "RuntimeError: UVA is not available". And the V2 runner captures its CUDA graphs
# outside the memory share it sizes the KV cache in, so on a full card (a desktop beside it) the
# graphs may not fit what the plan left. The V1 runner's accounting is the one the planner models and
# the one measured against vLLM (docs/PLANNER.md, "WSL2 and vLLM's model runner"). A value the user
# set in their shell wins.
VLLM_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
VLLM_RUNNER_VARIABLES = ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_WSL2_ENABLE_PIN_MEMORY")

# --- 8gb profile: our service (docker/Dockerfile.8gb) ----------------------------------------------
# torch 2.13 publishes CUDA builds for 12.6 (legacy: Maxwell..Hopper, no Blackwell) and 13.0
# (Turing..Blackwell incl. sm_120 = RTX 50xx); it ships no cu128 wheels. 13.0 is the one that runs
# on every card a user of this kit has, Turing (RTX 20xx) to Blackwell (RTX 50xx).
TORCH_VERSION = "2.13.0"
TORCHVISION_VERSION = "0.28.0"   # the torchvision released with torch 2.13
SERVICE_CUDA = "13.0"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu130"
# Small: torch's wheels bring their own CUDA libraries, so the base needs only the driver hooks that
# the nvidia/cuda images set up (NVIDIA_* env, the `cuda>=13.0` requirement the toolkit enforces).
SERVICE_BASE_IMAGE = "nvidia/cuda:13.0.2-base-ubuntu24.04"
SERVICE_IMAGE_REPO = "vlkit/service-8gb"
# The tags `vlkit build` gives the images (compose.yaml defaults to the same). The variables exist so
# that tests build and run their CPU variant without replacing a user's real image.
SERVICE_IMAGE = os.environ.get("VLKIT_SERVICE_IMAGE") or f"{SERVICE_IMAGE_REPO}:{VLKIT_VERSION}"
VLLM_SERVICE_IMAGE = os.environ.get("VLKIT_VLLM_IMAGE") or f"vlkit/vllm-16gb:{VLKIT_VERSION}-vllm{VLLM_VERSION}"

# The 8gb image's non-root user (docker/Dockerfile.8gb: useradd --uid, USER): a bind-mounted local
# model folder must be readable by it (`vlkit up` checks before starting).
SERVICE_UID = 10001

# Compute capabilities the 8gb image's torch build has kernels for (Turing .. Blackwell).
SERVICE_MIN_COMPUTE_CAPABILITY = (7, 5)

# Minimum NVIDIA driver per CUDA version (NVIDIA's CUDA toolkit release notes, "CUDA Toolkit and
# Corresponding Driver Versions"). Under WSL2 the driver is the Windows one; nvidia-smi inside WSL
# reports the Windows version number, so compare against "windows" there.
MIN_DRIVER: dict[str, dict[str, str]] = {
    "12.6": {"linux": "560.28.03", "windows": "560.76"},
    "12.8": {"linux": "570.26", "windows": "570.65"},
    "12.9": {"linux": "575.51.03", "windows": "576.02"},
    "13.0": {"linux": "580.65.06", "windows": "580.88"},
}

Profile = Literal["8gb", "16gb"]


def image_for(profile: Profile) -> str:
    """The image tag `vlkit up` runs for a profile (both are built locally from docker/)."""
    return SERVICE_IMAGE if profile == "8gb" else VLLM_SERVICE_IMAGE


def vllm_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the 16gb container's vLLM gets: VLLM_ENV, then the runner variables the user
    set themselves."""
    environ = os.environ if environ is None else environ
    return {**VLLM_ENV, **{k: environ[k] for k in VLLM_RUNNER_VARIABLES if environ.get(k)}}


def cuda_for(profile: Profile) -> str:
    return SERVICE_CUDA if profile == "8gb" else VLLM_CUDA


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def cuda_supported_by(driver_cuda: str, cuda: str) -> bool:
    """True when the driver's max CUDA (nvidia-smi's "CUDA Version", e.g. "12.8") covers `cuda`.

    The simplest check, valid on Linux and WSL alike: a driver runs every CUDA up to the one it reports.
    """
    return _version_tuple(driver_cuda)[:2] >= _version_tuple(cuda)[:2]
