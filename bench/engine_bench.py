"""The service's own engine (no HTTP) under the benchmark's request, in a fresh process.

``python -m bench`` runs this once per model size in a child process, so that time to ready counts
everything a start counts (imports, loading the checkpoint from disk, sizing the KV cache,
compiling, capturing graphs, the warm-up request) and the memory figures are this process alone.
The child prints one JSON object; the parent turns it into rows of its table (:func:`engine_rows`).

    python -m bench.engine_bench --model CHECKPOINT [--concurrency 1,4,8] [--new-tokens 128] [VLKIT flags]
"""
from __future__ import annotations

import time

STARTED = time.time()  # noqa: E402 - before the heavy imports: time to ready counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

GIB = 1024**3
PROMPT = ("Describe this picture for a visually impaired reader: the main objects, their colours and "
          "positions, any text you can read, and what is probably happening.")


def checkpoint_for(size: str, workdir: Path, device: str) -> Path:
    """A random-weight checkpoint of ``size`` (``4b``, ``4b-fp8``: Qwen's FP8 layout) with its
    processor on disk (built once, reused)."""
    from bench.workload import model_size

    path = workdir / f"qwen3-vl-{size}-random"
    if not (path / "config.json").is_file():
        from service.tiny_model import build_checkpoint

        architecture, fp8 = model_size(size)
        build_checkpoint(path, shape=architecture, device=device if architecture != "tiny" else None, fp8=fp8)
    return path


def engine_rows(size: str, args, workload, roofline: float | None, workdir: Path, service_args: list[str],
                starts: int, label: str = "engine") -> list[tuple[str, str]]:
    """Run the child for ``size`` ``starts`` times (the first with whatever compile cache there is,
    then warm) with these service flags, and return table rows named ``label: ...``."""
    checkpoint = checkpoint_for(size, workdir, args.device or "cuda")
    cache_dir = workdir / "compile-cache"
    command = [sys.executable, "-m", "bench.engine_bench", "--model", str(checkpoint),
               "--concurrency", ",".join(str(n) for n in args.engine_concurrency),
               "--new-tokens", str(args.new_tokens), "--image", f"{workload.image_width}x{workload.image_height}",
               "--compile-cache-dir", str(cache_dir), *service_args]
    if args.device:
        command += ["--device", args.device]
    runs = []
    for start in range(starts):
        spawned = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        name = "-".join(a.lstrip("-") for a in service_args)[:60] or "defaults"
        (workdir / f"engine-{size}-{name}-{start + 1}.log").write_text(done.stderr, encoding="utf-8")
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-3000:]
            print(tail, file=sys.stderr, flush=True)
            return [(label, f"failed (exit {done.returncode}): {tail.strip().splitlines()[-1] if tail.strip() else ''}")]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["ready_s"] = result["ready_at"] - spawned
        runs.append(result)
    last = runs[-1]
    rows = [("engine: service flags", " ".join(service_args) or "(defaults)"),
            ("engine: time to ready (process start to warmed up)",
             " / ".join(f"{r['ready_s']:.1f} s" for r in runs)
             + (" (cold / warm compile cache)" if len(runs) > 1 else "")),
            ("engine: start-up breakdown (last start)",
             ", ".join(f"{k} {v:.1f} s" for k, v in last["startup"].items())),
            ("engine: weights", last["weights"]),
            ("engine: decode graphs / attention", f"{last['graphs']} / {last['attention']}"),
            ("engine: memory plan", last["plan"] or "none (CPU)"),
            ("engine: prompt tokens / new tokens", f"{last['prompt_tokens']} / {args.new_tokens}"),
            ("engine: prepare one request (chat template + image processor, CPU)", f"{last['prepare_s'] * 1e3:.0f} ms")]
    for kind, points in (("different images", last["distinct_points"]), ("the same request", last["points"])):
        single = None
        for point in points:
            n = point["concurrency"]
            if n == 1:
                single = point["aggregate_tok_s"]
                share = f" ({point['decode_tok_s'] / roofline:.0%} of roofline)" if roofline else ""
                rows.append((f"engine, {kind}, 1 request: TTFT / decode",
                             f"{point['ttft_s']:.3f} s / {point['decode_tok_s']:.0f} tok/s{share}"))
            else:
                times = f" ({point['aggregate_tok_s'] / single:.1f}x 1 request)" if single else ""
                rows.append((f"engine, {kind}, {n} concurrent: median TTFT / per-stream decode / aggregate",
                             f"{point['ttft_s']:.3f} s / {point['decode_tok_s']:.0f} / "
                             f"{point['aggregate_tok_s']:.0f} tok/s{times}"))
    budget = last["budget_gib"]
    rows.append(("engine: peak process memory (NVML), whole run",
                 f"{last['peak_bytes'] / GIB:.2f} GiB (budget {budget:.1f} GiB: "
                 f"{'under' if last['peak_bytes'] <= budget * GIB else 'OVER'})" if last["plan"] else "n/a (CPU)"))
    return [(metric.replace("engine", label, 1), value) for metric, value in rows]


class PeakSampler:
    """Samples this process's GPU memory (NVML) every 5 ms in a thread."""

    def __init__(self, memory):
        self.memory = memory
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.memory.used())
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.memory.used())


def child(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--image", default="1280x704", help="WIDTHxHEIGHT of the request's image")
    args, service_args = parser.parse_known_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    from service.__main__ import settings_from_args
    from service.engine.memory import ProcessMemory

    settings = settings_from_args(["--model", args.model, *service_args])
    concurrency = [int(n) for n in args.concurrency.split(",")]
    if settings.max_batch_size < max(concurrency):
        settings = settings.model_copy(update={"max_batch_size": max(concurrency)})
    memory = ProcessMemory()  # before anything touches the GPU
    sampler = PeakSampler(memory)

    import numpy as np
    from PIL import Image

    from bench.engine_mode import engine_token_stream, measure_streams
    from service.decode.fp8 import describe, model_gemm
    from service.engine import Engine

    engine = Engine.load(settings)
    engine.start()
    ready_at = time.time()

    width, height = (int(v) for v in args.image.split("x"))
    def random_image(seed: int):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))

    image = random_image(0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    request = engine.prepare(messages, [image], max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    prepared = time.perf_counter()
    for _ in range(3):
        engine.prepare(messages, [image], max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    prepare_s = (time.perf_counter() - prepared) / 3

    def stream(req):
        return engine_token_stream(engine, req)

    def point(n: int, open_stream) -> dict:
        r = measure_streams(open_stream, n)
        return {"concurrency": n, "ttft_s": r.median_ttft_s, "decode_tok_s": r.decode_tok_s_per_stream,
                "aggregate_tok_s": r.aggregate_tok_s, "tokens": sum(x.tokens for x in r.results)}

    list(stream(request))  # the first full-length request after warm-up: not counted
    # Every request with its own image (prepared beforehand, as the same request is): nothing shared.
    distinct_points = []
    for n in concurrency:
        own = [engine.prepare(messages, [random_image(1000 * n + i)], max_tokens=args.new_tokens, temperature=0.0,
                              ignore_eos=True) for i in range(n)]
        distinct_points.append(point(n, lambda i, own=own: stream(own[i])))
    # The same request n times: after the first, its prompt blocks come from the prefix cache.
    points = [point(n, lambda _i: stream(request)) for n in concurrency]
    peak = sampler.stop()
    runner = engine.scheduler.batch.runner
    gemm = model_gemm(engine.model)
    result = {
        "weights": f"FP8, {describe(gemm)}" if gemm else str(engine.dtype).removeprefix("torch."),
        "ready_at": ready_at, "startup": engine.startup_seconds, "peak_bytes": peak,
        "budget_gib": settings.memory_budget_gib, "plan": engine.plan.describe() if engine.plan else None,
        "graphs": len(runner.graphs), "attention": runner.decoder.attention,
        "prompt_tokens": request.prompt_tokens, "points": points, "distinct_points": distinct_points,
        "prepare_s": prepare_s,
    }
    engine.stop()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(child())
