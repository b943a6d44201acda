"""Blocking work of one request, off the event loop, whose every failure reaches that request.

`asyncio.to_thread` cannot carry a StopIteration back (asyncio refuses to set it on a future, the
awaiting request then never answers: issue 15's processor case); `off_loop` turns it into a
RuntimeError, so that it is answered like any other error.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable


def _carried(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except StopIteration as exc:
        raise RuntimeError(f"StopIteration in {getattr(fn, '__qualname__', fn)}: {exc}") from exc


async def off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(functools.partial(_carried, fn, *args, **kwargs))
