"""vlkit's 8gb service against vLLM on the same GPU, the same memory and the same requests.

    python -m bench.versus_vllm --shape 2b --cards 8GiB,16GiB --concurrency 1,8,32

For each emulated card: the planner's plans for it (``plan_for(profile="8gb" / "16gb",
gpu_memory_bytes=card)``); our service started with the 8gb plan's settings (its memory budget is
the card's), vLLM with the 16gb plan's flags and its ``--gpu-memory-utilization`` rescaled so that
it takes the card's bytes of this GPU; then the same requests through the official openai SDK,
streaming: each request its own 1280x704 JPEG (nothing from a prefix cache) and the same text, 128
new tokens, greedy, ``ignore_eos``; 1, 8 and 32 at once. Prints both columns and their ratio
(vlkit / vLLM; above 1 is better for every row but TTFT, where below 1 is better), and writes the
table to $OUT/versus_vllm.md. ``--repeats N``: each concurrency N times (fresh images each time),
every figure the median of the N bursts (one burst varies by several percent). ``--vlkit-env K=V``:
settings for our server over the plan's (``OMP_NUM_THREADS=4``, ``VLKIT_MAX_NUM_BATCHED_TOKENS=2048``),
for A/B runs on one host. vLLM must be importable, or installed apart with its folder in
$VLLM_PYTHONPATH (see docs/BENCHMARKS.md for the device's install); the model is a random-weight checkpoint of the real shape (vLLM: ``--load-format dummy``).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from bench.engine_mode import measure_streams
from bench.planned import Plan
from service.smoke import PROMPT, _image_url, _PeakMemory

GIB = 1024**3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint(workdir: Path, shape: str) -> Path:
    """A random-weight checkpoint of the shape, written once (its config names the architecture, so
    vLLM serves it as a generative model)."""
    path = workdir / f"qwen3-vl-{shape}-random"
    if not (path / "config.json").is_file():
        import torch

        from service.tiny_model import build_checkpoint

        build_checkpoint(path, shape=shape, device="cuda" if torch.cuda.is_available() else None)
        torch.cuda.empty_cache()
    return path


class Server:
    """A server process in its own session (so its children die with it), its log, its base URL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, ready_path: str, log: Path):
        self.name, self.port, self.log = name, port, log
        self.base = f"http://127.0.0.1:{port}"
        self._ready_path = ready_path
        with log.open("w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
        self.proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, **env},
                                     start_new_session=True)
        self.started = time.perf_counter()

    def wait(self, timeout: float) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.base + self._ready_path, timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{self.name} did not become ready:\n" + "\n".join(tail))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_vlkit(ckpt: Path, plan, port: int, log: Path, overrides: dict[str, str] | None = None) -> Server:
    env = {k: v for k, v in plan.service_env.items() if k != "VLKIT_MODEL"}
    env.update(overrides or {})
    env.update(HF_HUB_OFFLINE="1", VLKIT_MODEL=str(ckpt), VLKIT_SERVED_MODEL_NAME="bench", VLKIT_PORT=str(port))
    return Server("vlkit", [sys.executable, "-m", "service"], env, port, "/health/ready", log)


def gpu_total_bytes() -> int:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total


def start_vllm(ckpt: Path, plan, card: int, port: int, log: Path) -> Server:
    args = list(plan.vllm_args)
    i = args.index("--gpu-memory-utilization")
    args[i + 1] = f"{float(args[i + 1]) * card / gpu_total_bytes():.4f}"  # the card's bytes of this GPU
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(ckpt), "--load-format", "dummy",
           "--runner", "generate", "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), *args]
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0",
           "VLLM_USE_DEEP_GEMM": "0"}
    if os.environ.get("VLLM_PYTHONPATH"):  # vLLM installed apart (its pins differ from the service's)
        env["PYTHONPATH"] = os.environ["VLLM_PYTHONPATH"]
    return Server("vLLM", cmd, env, port, "/health", log)


def drive(server: Server, concurrency: list[int], max_tokens: int, urls: list[str], repeats: int = 1) -> dict:
    """The same requests for every server: figures per concurrency, each the median of ``repeats`` bursts."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=600)

    def open_stream(url: str):
        def chunks(_index: int):
            stream = client.chat.completions.create(
                model="bench", max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": PROMPT}]}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk
        return chunks

    used = iter(urls)
    measure_streams(open_stream(next(used)), 1)  # the first request after start-up: not counted
    figures = {}
    for n in concurrency:
        bursts = []
        for _ in range(repeats):
            own = [next(used) for _ in range(n)]
            result = measure_streams(lambda i, own=own: open_stream(own[i])(i), n)
            bursts.append({"median TTFT (s)": result.median_ttft_s,
                           "per-stream decode (tok/s)": result.decode_tok_s_per_stream,
                           "aggregate (tok/s)": result.aggregate_tok_s})
        figures[n] = {metric: median(b[metric] for b in bursts) for metric in bursts[0]}
    return figures


def table(rows: list[tuple[str, float, float]], better_low: set[str]) -> str:
    lines = ["| case | vlkit | vLLM | vlkit / vLLM |", "|---|---|---|---|"]
    for name, ours, theirs in rows:
        ratio = ours / theirs if theirs else float("nan")
        lines.append(f"| {name} | {ours:.3f} | {theirs:.3f} | {ratio:.2f}{' (lower is better)' if any(b in name for b in better_low) else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m bench.versus_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2b")
    parser.add_argument("--cards", default="8GiB,16GiB")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlkit-versus"))
    parser.add_argument("--only", choices=("vlkit", "vllm"), help="run one side (e.g. where vLLM is not installed)")
    parser.add_argument("--repeats", type=int, default=1, help="bursts per concurrency; figures are their medians")
    parser.add_argument("--vlkit-env", action="append", default=[], metavar="K=V",
                        help="a setting for our server over the plan's (repeatable)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    overrides = {}
    for item in args.vlkit_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--vlkit-env takes KEY=VALUE, not {item!r}")
        overrides[key] = value
    args.workdir.mkdir(parents=True, exist_ok=True)
    concurrency = [int(n) for n in args.concurrency.split(",")]
    ckpt = checkpoint(args.workdir, args.shape)
    urls = [_image_url("jpeg", seed) for seed in range(1 + args.repeats * sum(concurrency))]
    report = [f"vlkit vs vLLM, Qwen3-VL {args.shape} random weights, each request its own 1280x704 JPEG, "
              f"{args.max_tokens} new tokens, openai SDK streaming"
              + (f", every figure the median of {args.repeats} bursts" if args.repeats > 1 else "")]
    for card_text in args.cards.split(","):
        plans = {"vlkit": Plan(ckpt, "8gb", card_text), "vLLM": Plan(ckpt, "16gb", card_text)}
        card = plans["vLLM"].gpu_total_bytes
        results, ready = {}, {}
        for name, plan in plans.items():
            if args.only and name.lower() != args.only or not plan.fits:
                continue
            port = free_port()
            log = args.workdir / f"{name}-{card_text}.log"
            memory = _PeakMemory()  # the device's use before the server: what the server adds is its own
            server = (start_vlkit(ckpt, plan, port, log, overrides) if name == "vlkit"
                      else start_vllm(ckpt, plan, card, port, log))
            try:
                ready[name] = server.wait(900)
                print(f"[versus] {card_text}: {name} ready in {ready[name]:.0f} s", flush=True)
                results[name] = drive(server, concurrency, args.max_tokens, urls, args.repeats)
                results[name]["peak"] = (memory.peak - memory.baseline) / GIB
            except Exception as exc:  # noqa: BLE001 - the other side's figures still stand
                print(f"[versus] {card_text}: {name} failed: {type(exc).__name__}: {exc}", flush=True)
            finally:
                server.stop()
                memory.stop()
        rows = []
        for n in concurrency:
            for metric in ("median TTFT (s)", "per-stream decode (tok/s)", "aggregate (tok/s)"):
                ours, theirs = (results.get(s, {}).get(n, {}).get(metric, float("nan")) for s in ("vlkit", "vLLM"))
                rows.append((f"{card_text}, {n} concurrent: {metric}", ours, theirs))
        rows.append((f"{card_text}: peak GPU memory above idle (GiB)", results.get("vlkit", {}).get("peak", float("nan")),
                     results.get("vLLM", {}).get("peak", float("nan"))))
        rows.append((f"{card_text}: time to ready (s)", ready.get("vlkit", float("nan")), ready.get("vLLM", float("nan"))))
        ours = {**plans["vlkit"].service_env, **overrides}
        settings = (f"vlkit: {' '.join(f'{k}={v}' for k, v in ours.items())}; "
                    f"vLLM: {' '.join(plans['vLLM'].vllm_args)}")
        report += ["", f"### {card_text} card", "", settings, "", table(rows, {"TTFT", "memory", "ready"})]
        print("\n".join(report[-3:]), flush=True)
    text = "\n".join(report) + "\n"
    print("\n" + text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "versus_vllm.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
