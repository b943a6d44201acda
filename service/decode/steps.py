"""Work that can be interleaved: a generator that yields between its launches and returns its result.

A prefill pass is ~50 units of host work (the vision tower's blocks, the decoder's layers) that on a
fast GPU take longer to launch than to run. Written as a generator, the scheduler can launch a
decode step between two of them (service/engine/scheduler.py), so running rows keep decoding while a
prompt is prefilled, as vLLM's mixed prefill/decode steps let them. Everything stays on one thread
and one CUDA stream, so the device runs the pieces in the order they were launched.
"""
from __future__ import annotations

from collections.abc import Generator
from typing import Any

Steps = Generator[None, None, Any]


def run_steps(steps: Steps) -> Any:
    """Run ``steps`` to the end, with nothing between them; their result."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value
