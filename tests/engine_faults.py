"""Faults the tests inject into a running engine through its one seam: the scheduler's batch.

The engine has no fault hook of its own; a test wraps the batch's device work (a prefill pass, a
decode step) so that the next call raises, which drives the same error path a real CUDA
out-of-memory takes, on a machine without a GPU.
"""
from __future__ import annotations

import threading
import time


def fail_next_forward(engine, exc: BaseException, *, prefill: bool = True, decode: bool = True,
                      after_steps: int = 0) -> None:
    """Make the next prefill pass or decode step of ``engine`` (those chosen) raise ``exc``, once;
    then the batch's own methods are back. A pass raises after ``after_steps`` of its steps (vision
    blocks, decoder layers: a pass that fails part way, decode steps maybe run between)."""
    batch = engine.scheduler.batch
    targets = [(obj, name) for obj, name, on in ((batch.prefiller, "pass_steps", prefill), (batch, "decode", decode))
               if on]
    once = threading.Lock()

    def restore() -> None:
        for obj, name in targets:
            vars(obj).pop(name, None)

    def failing_pass(steps):
        for _ in range(after_steps):
            next(steps)
            yield
        raise exc

    def wrap(obj, name, method):
        def call(*args, **kwargs):
            if once.acquire(blocking=False):
                restore()
                if name == "pass_steps":
                    return failing_pass(method(*args, **kwargs))
                raise exc
            return method(*args, **kwargs)
        return call

    for obj, name in targets:
        setattr(obj, name, wrap(obj, name, getattr(obj, name)))


def slow_decode(engine, seconds: float) -> None:
    """Make every decode step of ``engine`` take at least ``seconds`` (requests that stay running
    long enough for a test to act while they do, whatever the machine's speed), from now on."""
    batch = engine.scheduler.batch
    decode = batch.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    batch.decode = slow

