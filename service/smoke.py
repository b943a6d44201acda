"""GPU smoke run of the whole service over HTTP, with a random-weight model of a real Qwen3-VL size.

    python -m service.smoke --shape 2b --workdir /tmp/vlkit-smoke

Builds the checkpoint (once; weights initialised on the GPU), starts ``python -m service`` on
127.0.0.1, and drives it with the official openai SDK: one 1280x704 image (880 image tokens) plus
~40 text tokens, 128 new tokens, greedy, ``ignore_eos`` - first alone (5 requests one after another:
median (min-max)), then 8 at once. Every request carries its own image, so nothing comes from the
prefix cache (``--same-image``: one image for all, the cached case). Prints time to ready, time-to-first-token, decode tokens/s and peak
GPU memory (NVML: the device's used memory above what it used before the server started). Needs a
CUDA GPU, and openai + fastapi + uvicorn.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.readiness import wait_ready

SINGLE_RUNS = 5
PROMPT = ("Describe this picture for a visually impaired reader: the main objects, their colours and "
          "positions, any text you can read, and what is probably happening. Keep it to one short paragraph.")


def _image_url(image_format: str = "png", seed: int = 0, width: int = 1280, height: int = 704) -> str:
    """A data URL of random pixels: PNG (incompressible, 3.6 MB of base64: the worst case) or JPEG
    (quality 90, as a camera or a browser would send it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, image_format.upper(), **({"quality": 90} if image_format == "jpeg" else {}))
    return f"data:image/{image_format};base64," + base64.b64encode(buf.getvalue()).decode()


class _PeakMemory:
    """Samples the device's used memory (NVML) every 20 ms."""

    def __init__(self):
        import pynvml

        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except pynvml.NVMLError:
            self._handle = None  # no GPU (a dry run on the CPU): memory figures read 0
        self._nvml = pynvml
        self.baseline = self.used()
        self.peak = self.baseline
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used if self._handle is not None else 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def reset(self):
        self.peak = self.used()

    def stop(self):
        self._stop.set()


def _one(client, model: str, url: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": PROMPT}]}])
    for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"ttft": first - start, "end": end - start, "tokens": usage.completion_tokens,
            "prompt": usage.prompt_tokens, "decode": (usage.completion_tokens - 1) / max(end - first, 1e-9)}


def _server_ttft(base: str) -> tuple[float, float]:
    """(sum, count) of the server's time-to-first-token histogram: arrival of the request to its first
    token, without the client's encoding and the upload of the image."""
    import httpx

    values = {}
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        name, _, value = line.rpartition(" ")
        name = name.split("{")[0]
        if name in ("vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count"):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values.get("sum", 0.0), values.get("count", 0.0)


def _spread(values: list[float], fmt: str) -> str:
    """median (min-max)"""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlkit-smoke"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png",
                        help="how the image travels: png (random pixels: 3.6 MB of base64) or jpeg")
    parser.add_argument("--same-image", action="store_true",
                        help="every request with the same image (after the first, its prompt comes from the prefix cache)")
    args, service_args = parser.parse_known_args(argv)

    checkpoint = args.workdir / f"qwen3-vl-{args.shape}-random"
    if not (checkpoint / "config.json").is_file():
        import torch

        from service.tiny_model import build_checkpoint

        t = time.perf_counter()
        build_checkpoint(checkpoint, shape=args.shape, device="cuda" if torch.cuda.is_available() else None)
        print(f"built {checkpoint} in {time.perf_counter() - t:.1f} s", flush=True)
        torch.cuda.empty_cache()

    from openai import OpenAI

    memory = _PeakMemory()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(args.workdir / "service.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(checkpoint), "--served-model-name",
                             "smoke", "--port", str(port), *service_args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_ready(base, float("inf"), alive=lambda: proc.poll() is None):
            raise SystemExit(f"the service exited with {proc.returncode}; see {log.name}")
        ready_s = time.perf_counter() - started
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        # Each request its own image (made before timing), so the prefix cache has nothing to give:
        # every figure includes the vision tower and the whole prefill. --same-image: one for all.
        count = 1 + SINGLE_RUNS + args.concurrency
        urls = [_image_url(args.image_format, 0 if args.same_image else seed) for seed in range(count)]
        url = urls[0]
        _one(client, "smoke", url, 8)  # first request after warm-up: excluded from the figures
        memory.reset()
        singles, server_ttfts = [], []
        for _ in range(SINGLE_RUNS):
            before = _server_ttft(base)
            singles.append(_one(client, "smoke", urls[1 + len(singles)], args.max_tokens))
            after = _server_ttft(base)
            server_ttfts.append((after[0] - before[0]) / max(after[1] - before[1], 1))
        peak_single = memory.peak - memory.baseline
        memory.reset()
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            many = list(pool.map(lambda i: _one(client, "smoke", urls[1 + SINGLE_RUNS + i], args.max_tokens),
                                 range(args.concurrency)))
        wall = time.perf_counter() - t
        peak_many = memory.peak - memory.baseline
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        memory.stop()

    gib = 1024**3
    total = sum(r["tokens"] for r in many)
    print(f"\nQwen3-VL {args.shape} (random weights), prompt {singles[0]['prompt']} tokens, "
          f"{args.max_tokens} new tokens, image as {args.image_format} ({len(url) / 1e6:.1f} MB data URL), "
          f"{'the same image in every request' if args.same_image else 'a different image in every request'}")
    print(f"{'figure':52s} value")
    print(f"{'start to /health/ready (load + warm-up)':52s} {ready_s:.1f} s")
    print(f"{'1 request: time to first token':52s} {_spread([r['ttft'] for r in singles], '.3f')} s")
    print(f"{'1 request: decode':52s} {_spread([r['decode'] for r in singles], '.1f')} tok/s")
    print(f"{'1 request: TTFT in the server (arrival to 1st token)':52s} {_spread(server_ttfts, '.3f')} s")
    print(f"{'1 request: end to end (all tokens over the whole time)':52s} "
          f"{_spread([r['tokens'] / r['end'] for r in singles], '.1f')} tok/s")
    print(f"{'1 request: peak GPU memory (NVML, process)':52s} {peak_single / gib:.2f} GiB")
    print(f"{f'{args.concurrency} concurrent: mean time to first token':52s} "
          f"{sum(r['ttft'] for r in many) / len(many):.3f} s")
    print(f"{f'{args.concurrency} concurrent: aggregate tokens/s':52s} {total / wall:.1f} tok/s")
    print(f"{f'{args.concurrency} concurrent: peak GPU memory':52s} {peak_many / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
