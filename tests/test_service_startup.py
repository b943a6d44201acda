"""`python -m service`'s start-up as a process: interrupted while it loads, the port, the batch's memory."""
from __future__ import annotations

import contextlib
import signal
import socket
import threading

import httpx
import pytest

from service.readiness import wait_ready
from tests.conftest import free_port
from tests.test_service_cli import run_service

LOADING = "service.engine.loading: loading"  # the log line the load thread writes as it starts


@contextlib.contextmanager
def killed_after(proc, seconds: float):
    """Kill `proc` if it still runs after `seconds` (its output then ends and the test fails on it)."""
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_ctrl_c_while_the_model_loads_exits_130_in_one_line(tiny_model_dir):
    """The load runs in a daemon thread: Ctrl-C let the interpreter exit while that thread was inside
    torch, which aborted the process (SIGABRT, 'terminate called without an active exception') 2 times in 3."""
    for _ in range(3):  # the tiny model loads in half a second: the load may win the race; then try again
        proc = run_service(["--model", str(tiny_model_dir), "--port", str(free_port()), "--log-level", "info"])
        seen = []
        with killed_after(proc, 120):  # a line that never comes: the service would start and serve for ever
            for line in proc.stdout:
                seen.append(line)
                if LOADING in line:
                    proc.send_signal(signal.SIGINT)
                    break
            out = "".join(seen) + proc.communicate(timeout=60)[0]
        assert "Traceback" not in out and "terminate called" not in out, out
        if proc.returncode != 0:
            break
        assert "interrupted" not in out, out  # the load ended before the signal landed: the usual stop
    else:
        raise AssertionError("the load finished before Ctrl-C every time")
    assert proc.returncode == 130, out
    assert out.rstrip().endswith("\ninterrupted while the model was loading"), out


# What pip writes for pyproject.toml's `vlkit-service = "service.__main__:main"`: main() itself, not the module run as __main__.
CONSOLE_SCRIPT = ["-c", "import sys; from service.__main__ import main; sys.exit(main())"]


# The import whose end is main()'s start (the module's last top-level import; the script imports the
# module first), then one main() makes; pydantic and torch follow.
@pytest.mark.parametrize("entry, imported", [
    (["-m", "service"], "typing"), (["-m", "service"], "service.settings"),
    (CONSOLE_SCRIPT, "service.__main__"), (CONSOLE_SCRIPT, "service.settings"),
], ids=["python -m service, typing", "python -m service, settings", "vlkit-service, module", "vlkit-service, settings"])
def test_ctrl_c_during_the_imports_exits_130_in_one_line(tiny_model_dir, imported, entry):
    """Before the load thread exists the service spends seconds importing (pydantic, then torch):
    Ctrl-C there printed a KeyboardInterrupt traceback, and did under the `vlkit-service` script
    after `python -m service` no longer did. Python's import-time report (stderr, one line as each
    import ends) says where the start is."""
    proc = run_service(["--model", str(tiny_model_dir), "--port", str(free_port())], {"PYTHONPROFILEIMPORTTIME": "1"},
                       entry=entry)
    seen = []
    with killed_after(proc, 120):  # a line that never comes: the service would start and serve for ever
        for line in proc.stdout:
            seen.append(line)
            if line.rstrip().endswith(f"| {imported}"):
                proc.send_signal(signal.SIGINT)
                break
        out = "".join(seen) + proc.communicate(timeout=60)[0]
    assert LOADING not in out, out
    said = [line for line in out.splitlines() if not line.startswith("import time:")]
    assert said == ["interrupted while the service was starting"], out
    assert proc.returncode == 130, out


def test_a_port_in_use_is_said_in_one_line_before_anything_loads(tiny_model_dir):
    """uvicorn binds after the app's start-up, which starts the load: the port was found taken only
    then (after minutes on a GPU), in uvicorn's words, exit status 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_service(["--model", str(tiny_model_dir), "--port", str(port), "--log-level", "info"])
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and LOADING not in out, out
    assert out.strip() == (f"error: --port / VLKIT_PORT: 127.0.0.1:{port} is taken (address already in use): "
                           "another program listens there; stop it or choose another port"), out


def test_the_port_of_a_server_that_just_stopped_is_not_taken(tiny_model_dir):
    """The service binds its socket itself, as uvicorn would (SO_REUSEADDR): a port whose connections
    still linger after its server stopped (FIN-WAIT-2, TIME_WAIT) binds again at once."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["--model", str(tiny_model_dir), "--port", str(port), "--no-warmup"]
    with httpx.Client() as client:  # a keep-alive connection, which the stopping server closes first
        proc = run_service(args)
        assert wait_ready(base, 120, alive=lambda: proc.poll() is None), proc.stdout.read()
        assert client.get(base + "/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        with socket.socket() as plain, pytest.raises(OSError):  # without SO_REUSEADDR: taken
            plain.bind(("127.0.0.1", port))
        proc = run_service(args)
        try:
            assert wait_ready(base, 120, alive=lambda: proc.poll() is None), proc.stdout.read()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


def test_a_batch_too_large_for_the_memory_names_max_batch_size_and_what_it_needs(tiny_model_dir):
    """max_batch_size sizes a row of buffers per request (and on the CPU a whole context of KV cache
    each): a huge one failed in the allocator, in torch's words ('DefaultCPUAllocator: can't allocate
    memory: you tried to allocate 26214408192 bytes')."""
    proc = run_service(["--model", str(tiny_model_dir), "--port", str(free_port()), "--max-batch-size", "100000000"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in out and "allocate" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: --max-batch-size 100000000 needs "), out
    assert "GiB (the rows' logits, inputs and block table: " in last and "the KV cache of 100000000 sequences" in last
    assert last.endswith("GiB this machine has available: lower --max-batch-size or --max-model-len"), out
