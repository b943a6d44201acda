"""Faults the tests inject into a running engine through its one seam: the scheduler's batch.

The engine has no fault hook of its own; a test wraps the batch's device work (a prefill pass, a
decode step) so that the next call raises, which drives the same error path a real CUDA
out-of-memory takes, on a machine without a GPU.
"""
from __future__ import annotations

import threading
import time


def fail_next_forward(engine, exc: BaseException, *, prefill: bool = True, decode: bool = True) -> None:
    """Make the next prefill pass or decode step of ``engine`` (those chosen) raise ``exc``, once;
    then the batch's own methods are back."""
    batch = engine.scheduler.batch
    targets = [(obj, name) for obj, name, on in ((batch.prefiller, "run_pass", prefill), (batch, "decode", decode))
               if on]
    once = threading.Lock()

    def wrap(method):
        def call(*args, **kwargs):
            if once.acquire(blocking=False):
                for obj, name in targets:
                    vars(obj).pop(name, None)
                raise exc
            return method(*args, **kwargs)
        return call

    for obj, name in targets:
        setattr(obj, name, wrap(getattr(obj, name)))


def slow_decode(engine, seconds: float) -> None:
    """Make every decode step of ``engine`` take at least ``seconds`` (requests that stay running
    long enough for a test to act while they do, whatever the machine's speed), from now on."""
    batch = engine.scheduler.batch
    decode = batch.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    batch.decode = slow

