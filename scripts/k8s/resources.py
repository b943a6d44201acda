"""What one vLLM pod asks of its node besides the GPUs: CPU, memory, /dev/shm and the cache volume.

The GPU memory is the planner's business (the flags); these are host-side figures for vLLM 0.27's
process layout: one API server process (HTTP, tokenization, image decoding and resizing), one engine
core process (the scheduler, a busy loop) and, with tensor parallelism, one worker process per GPU.
"""
from __future__ import annotations

import math

GIB = 1024**3

# CPU: a core each for the API server and the engine core, two per GPU for its worker and for image
# preprocessing (the part of a vision-language model that runs on the CPU). A request, no limit: a
# CPU limit throttles the busy loops and shows up as latency, not as savings.
CPU_BASE = 2
CPU_PER_GPU = 2

# vLLM processes share tensors through /dev/shm (the tensor-parallel workers' message queue, NCCL's
# shared-memory transport). A memory-backed emptyDir counts against the container's memory limit,
# so the limit below includes it; sizeLimit is a cap, unused pages cost nothing.
SHM_PER_GPU_GIB = 2

# Memory: vLLM's multimodal processor cache (--mm-processor-cache-gb, 4 GiB by default) is held
# twice, by the API server and the engine core; each process needs ~2 GiB besides (Python, torch,
# CUDA libraries, the HF processor). Weights are read through the page cache, which the kernel
# reclaims under the limit rather than killing the pod, so they are not counted.
MM_PROCESSOR_CACHE_GIB = 4
PROCESS_GIB = 2
MEMORY_BASE_GIB = 2 * MM_PROCESSOR_CACHE_GIB + 2 * PROCESS_GIB
MEMORY_PER_GPU_GIB = PROCESS_GIB + SHM_PER_GPU_GIB

# The model cache volume: the checkpoint (a quarter more for the tokenizer and processor files and
# for a new revision's blobs beside the old ones) and 5 GiB for vLLM's torch.compile cache, rounded
# up to 10 GiB steps (cloud disks are billed and sized in steps anyway).
CACHE_WEIGHT_FACTOR = 1.25
CACHE_EXTRA_GIB = 5
CACHE_STEP_GIB = 10

# The download init container: huggingface_hub's downloader (hf_xet) and nothing else.
DOWNLOAD_CPU = 1
DOWNLOAD_MEMORY_GIB = 4


def cpu_request(gpus: int) -> int:
    return CPU_BASE + CPU_PER_GPU * gpus


def shm_gib(gpus: int) -> int:
    return SHM_PER_GPU_GIB * gpus


def memory_gib(gpus: int) -> int:
    """Request and limit alike: an OOM kill then stays inside this pod instead of its neighbours'."""
    return MEMORY_BASE_GIB + MEMORY_PER_GPU_GIB * gpus


def cache_gib(weight_bytes: int) -> int:
    need = CACHE_WEIGHT_FACTOR * weight_bytes / GIB + CACHE_EXTRA_GIB
    return max(CACHE_STEP_GIB, math.ceil(need / CACHE_STEP_GIB) * CACHE_STEP_GIB)
