"""The planner's golden grid: every plan over cards x built-in models x profiles x contexts.

tests/data/planner_golden.json holds what the planner answered for each case when it was last
recorded; tests/test_planner_golden.py asserts it still answers the same. A change to the planner
that means to change a plan re-records on purpose, and the diff of the JSON file is the review:

    .venv/bin/python tests/planner_golden.py      # rewrites tests/data/planner_golden.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "planner_golden.json"
GIB = 1024**3

CARDS_GIB = (6, 8, 10, 12, 16, 24)
CONTEXTS = (None, 4096)
PROFILES = ("8gb", "16gb", "auto")


def _measured(free_gib: float, total_gib: int = 16) -> list:
    from scripts.gpu import GpuInfo
    return [GpuInfo(index=0, name="NVIDIA GeForce RTX 4060 Ti", uuid=None, total_bytes=total_gib * GIB,
                    free_bytes=int(free_gib * GIB), used_bytes=int((total_gib - free_gib) * GIB),
                    driver_version="580.88", cuda_driver_version="13.0", compute_capability=(8, 9))]


def cases() -> dict[str, dict]:
    """name -> plan_for's keyword arguments (``gpus`` as the free GiB of a measured 16 GiB card)."""
    from scripts.planner.models import BUILTIN_IDS

    out: dict[str, dict] = {}
    for gib in CARDS_GIB:
        for model in BUILTIN_IDS:
            for profile in PROFILES:
                for context in CONTEXTS:
                    out[f"{gib}GiB {model} {profile} context={context}"] = dict(
                        model=model, profile=profile, gpu_memory_bytes=gib * GIB, context=context)
    # Beyond the grid: long and odd contexts, tensor parallel, measured cards, evaluated settings, errors.
    for model in ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct-FP8", "Qwen/Qwen3-VL-8B-Instruct"):
        for gib in (8, 16, 24):
            for profile in PROFILES:
                for context in (2000, 16384, 200_000):
                    out[f"{gib}GiB {model} {profile} context={context}"] = dict(
                        model=model, profile=profile, gpu_memory_bytes=gib * GIB, context=context)
            for util in (0.7, 0.8, 0.9):
                for context in (None, 2048, 4096):
                    out[f"{gib}GiB {model} util={util} context={context}"] = dict(
                        model=model, profile="auto", gpu_memory_bytes=gib * GIB, context=context,
                        gpu_memory_utilization=util)
        for gpus in (2, 4):
            for profile in PROFILES:
                out[f"{gpus}x12GiB {model} {profile}"] = dict(
                    model=model, profile=profile, gpu_memory_bytes=12 * GIB, gpu_count=gpus)
        for free in (15.2, 11.0, 6.5):
            for profile in PROFILES:
                out[f"measured 16GiB/{free} free {model} {profile}"] = dict(
                    model=model, profile=profile, gpus=free)
    out["error: --context too long"] = dict(model="Qwen/Qwen3-VL-2B-Instruct", gpu_memory_bytes=8 * GIB,
                                            context=10**6)
    out["error: --context 8"] = dict(model="Qwen/Qwen3-VL-2B-Instruct", gpu_memory_bytes=8 * GIB, context=8)
    out["error: 3 GPUs"] = dict(model="Qwen/Qwen3-VL-8B-Instruct", gpu_memory_bytes=12 * GIB, gpu_count=3)
    out["error: 8gb with a utilization"] = dict(model="Qwen/Qwen3-VL-2B-Instruct", profile="8gb",
                                                gpu_memory_bytes=8 * GIB, gpu_memory_utilization=0.8)
    out["error: bad profile"] = dict(model="Qwen/Qwen3-VL-2B-Instruct", profile="12gb", gpu_memory_bytes=8 * GIB)
    return out


def answer(kwargs: dict) -> dict:
    """What plan_for answers: the plan as JSON, or the error's message. Messages are recorded as a
    `vlkit plan` user reads them (flags, not make variables: VLKIT_VIA_MAKE unset)."""
    from scripts.planner import plan_for

    kwargs = dict(kwargs)
    if "gpus" in kwargs:
        kwargs["gpus"] = _measured(kwargs["gpus"])
    try:
        return json.loads(json.dumps(plan_for(**kwargs).to_dict()))
    except ValueError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def record() -> None:
    os.environ.pop("VLKIT_VIA_MAKE", None)
    data = {name: answer(kwargs) for name, kwargs in cases().items()}
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{GOLDEN.relative_to(ROOT)}: {len(data)} cases")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    record()
