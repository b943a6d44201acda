"""`python -m service`'s start-up as a process: interrupted while it loads, the port, the batch's memory."""
from __future__ import annotations

import signal

from tests.test_service_cli import run_service
from tests.conftest import free_port

LOADING = "service.engine.loading: loading"  # the log line the load thread writes as it starts


def test_ctrl_c_while_the_model_loads_exits_130_in_one_line(tiny_model_dir):
    """The load runs in a daemon thread: Ctrl-C let the interpreter exit while that thread was inside
    torch, which aborted the process (SIGABRT, 'terminate called without an active exception') 2 times in 3."""
    for _ in range(3):  # the tiny model loads in half a second: the load may win the race; then try again
        proc = run_service(["--model", str(tiny_model_dir), "--port", str(free_port()), "--log-level", "info"])
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if LOADING in line:
                proc.send_signal(signal.SIGINT)
                break
        out = "".join(seen) + proc.communicate(timeout=60)[0]
        assert "Traceback" not in out and "terminate called" not in out, out
        if "ready:" not in out:
            break
        assert proc.returncode == 0, out  # it was ready before the signal landed: the usual stop
    else:
        raise AssertionError("the load finished before Ctrl-C every time")
    assert proc.returncode == 130, out
    assert out.rstrip().endswith("\ninterrupted while the model was loading"), out
