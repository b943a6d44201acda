"""Waiting for a service to say it is ready: used by the smoke run and the tests."""
from __future__ import annotations

import time
from typing import Callable

import httpx


def wait_ready(base: str, timeout: float, *, alive: Callable[[], bool] = lambda: True,
               poll: float = 0.1) -> bool:
    """Poll ``base``/health/ready until it answers 200 (True), the deadline passes or ``alive()``
    turns false (False): a process that died is not waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(base + "/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return False
