"""Start `vllm serve` on a model directory, wait for what the caller needs, read its figures, stop it.

Torch-free; the calibration (validate_on_gpu.py) starts vLLM here. bench/versus_vllm.py has its own
small launcher: bench/ is in the 8gb image, which has no scripts/.

    with vllm_server(model_dir, args, port=free_port(), log_path=log, wait="kv", check=False) as s:
        figures = s.figures()              # "Available KV cache memory", the profiling breakdown, ...
    with vllm_server(model_dir, args, port=port, log_path=log, env=env) as s:   # wait="health"
        ...send requests to s.url...

The server runs in its own process group (vLLM's engine core is a child process); leaving the
block stops the whole group (SIGTERM, then SIGKILL), so nothing outlives a call or holds the port.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

VLLM_COMMAND = (sys.executable, "-m", "vllm.entrypoints.cli.main", "serve")   # `vllm serve` without its script
# vLLM's own log lines (0.24 and 0.27 wordings): figure -> pattern (its groups are the figure).
PATTERNS: dict[str, str] = {
    "available_kv_gib": r"Available KV cache memory: (-?[\d.]+) GiB",
    "kv_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
    "weights_gib": r"Model loading took ([\d.]+) GiB",
    "non_kv_gib": r"Total non KV cache memory: ([\d.]+) ?GiB",
    "torch_peak_increase_gib": r"torch peak memory increase: ([\d.]+) ?GiB",
    "non_torch_increase_gib": r"non-torch forward increase memory: ([\d.]+) ?GiB",        # 0.24
    "total_consumed_gib": r"total consumed \(from mem_get_info\): ([\d.]+) ?GiB",          # 0.27
    "cuda_graph_estimate_gib": r"Estimated CUDA graph memory: ([\d.]+) GiB total",
    "cuda_graph_actual_gib": r"Graph capturing finished in \d+ secs, took (-?[\d.]+) GiB",
    "encoder_budget_tokens": r"Encoder cache will be initialized with a budget of (\d+) tokens",
    "profiled_items": r"and profiled with (\d+) \w+ items of the maximum feature size",
    "vllm_version": r"Initializing a V1 LLM engine \(v([\w.+-]+)\)",   # the API server's banner is ASCII art
}
# "Estimated PIECEWISE CUDA graph memory: 180.00 MiB first-capture + (51-1) × 2.00 MiB per-graph" (DEBUG)
GRAPH_MODE = re.compile(r"Estimated (\w+) CUDA graph memory: ([\d.]+) MiB first-capture \+ \((\d+)-1\) \S+ ([\d.]+) MiB")
KV_LOGGED = re.compile(r"Maximum concurrency for [\d,]+ tokens per request")
ERRORS = re.compile(r"No available memory for the cache blocks|larger than the available KV cache memory|"
                    r"Free memory on device .* is less than desired GPU memory utilization|UVA is not available|"
                    r"CUDA out of memory|OutOfMemoryError|Engine core initialization failed|"
                    r"ValueError: .*|RuntimeError: .*")
Wait = Literal["health", "kv"]


class VllmStartError(RuntimeError):
    """vLLM did not reach what the caller waited for; the message ends with its last log lines."""


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (one per server: an old one may linger)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_log(text: str) -> dict:
    """vLLM's figures in a log: the last value of each PATTERNS line, the CUDA graph estimate per
    mode, whether the V2 model runner ran, and the first error line."""
    found: dict = {}
    for key, pattern in PATTERNS.items():
        values = re.findall(pattern, text)
        if values:
            value = values[-1].replace(",", "")
            found[key] = value if key == "vllm_version" else float(value) if "." in value else int(value)
    modes = {m[0]: {"first_mib": float(m[1]), "graphs": int(m[2]), "per_graph_mib": float(m[3])}
             for m in GRAPH_MODE.findall(text)}
    if modes:
        found["cuda_graph_modes"] = modes
    found["v2_runner"] = "Using V2 Model Runner" in text
    error = ERRORS.search(text)
    found["error"] = _line_at(text, error.start()) if error else None
    return found


def _line_at(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start:end if end >= 0 else None].strip()


@dataclass
class VllmServer:
    """A running `vllm serve` (its process group), its port and its log."""
    process: subprocess.Popen
    port: int
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def figures(self) -> dict:
        return {**parse_log(self.log()), "seconds": round(time.monotonic() - self.started, 1)}

    def healthy(self) -> bool:
        # trust_env=False: a proxy from the environment (HTTP_PROXY) must not carry a request for 127.0.0.1.
        try:
            return httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait(self, until: Wait, timeout_s: float, poll_s: float = 0.5) -> str:
        """Block until vLLM has logged its KV cache size ("kv") or answers /health ("health").
        Returns that word, or "exited" (the process ended first) or "timeout"."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until == "kv" and KV_LOGGED.search(self.log()):
                return "kv"
            if until == "health" and self.healthy():
                return "health"
            if self.process.poll() is not None:
                return until if until == "kv" and KV_LOGGED.search(self.log()) else "exited"
            time.sleep(poll_s)
        return "timeout"

    def stop(self, grace_s: float = 10) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                _wait_group_gone(self.process.pid, wait)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """The engine core may outlive the API server by a moment: wait until no member is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout_s)


@contextmanager
def vllm_server(model_dir: str | Path, args: Sequence[str], *, port: int, log_path: Path,
                env: dict[str, str] | None = None, wait: Wait | None = "health", timeout_s: float = 900,
                check: bool = True, command: Sequence[str] = VLLM_COMMAND,
                stop_grace_s: float = 10) -> Iterator[VllmServer]:
    """`vllm serve MODEL_DIR --host 127.0.0.1 --port PORT ARGS` with ``env`` over this process's
    environment, its output in ``log_path``; waits as asked (``check``: raise VllmStartError when
    that is not reached), yields the server, and stops its process group on the way out."""
    cmd = [*command, str(model_dir), "--host", "127.0.0.1", "--port", str(port), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    server = VllmServer(process, port, log_path)
    try:
        if wait is not None:
            outcome = server.wait(wait, timeout_s)
            if check and outcome != wait:
                tail = "\n".join(server.log().splitlines()[-30:])
                raise VllmStartError(f"vLLM on port {port}: {outcome} before {wait} "
                                     f"({server.figures().get('error') or 'no error line'})\n{tail}")
        yield server
    finally:
        server.stop(stop_grace_s)
