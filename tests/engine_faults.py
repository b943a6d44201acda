"""Faults the tests inject into a running engine through its one seam: the scheduler's batch.

The engine has no fault hook of its own; a test wraps the batch's device work (prefill, decode
step) so that the next call raises, which drives the same error path a real CUDA out-of-memory
takes, on a machine without a GPU.
"""
from __future__ import annotations

import threading


def fail_next_forward(engine, exc: BaseException, *, only: tuple[str, ...] = ("admit", "decode")) -> None:
    """Make the next prefill (``admit``) or decode step of ``engine`` raise ``exc``, once; then the
    batch's own methods are back."""
    batch = engine.scheduler.batch
    once = threading.Lock()

    def wrap(method):
        def call(*args, **kwargs):
            if once.acquire(blocking=False):
                for name in only:
                    vars(batch).pop(name, None)
                raise exc
            return method(*args, **kwargs)
        return call

    for name in only:
        setattr(batch, name, wrap(getattr(batch, name)))
