"""The engine alone (no HTTP) under a burst of image requests: prepared beforehand or in each
request's own thread, with torch's intra-op threads at each count given.

    python -m bench.engine_burst CHECKPOINT [--concurrency 8,32] [--threads 1,16] [ENGINE FLAGS ...]

Each request has its own 1280x704 JPEG (the smoke's prompt), 128 new tokens, greedy, ``ignore_eos``;
the engine is started with ENGINE FLAGS (the service's, e.g. the 8 GiB card's plan: ``--memory-budget-gib
7 --max-batch-size 8 --max-num-batched-tokens 1024``). For each concurrency: one burst of requests
prepared beforehand (the engine's own speed), then one burst per ``--threads`` count of requests
prepared in their own threads (JPEG decode, chat template, image processor: what the HTTP layer does),
torch's intra-op threads set to that count. Per burst: aggregate tok/s, median TTFT, and the scheduler
thread's host time in prefill passes (each waits for the device at its end, so this is their wall time)
and in launching decode steps (which it does not wait for). Prints a table; with $OUT set,
$OUT/engine_burst.md gets it too.
"""
from __future__ import annotations

import argparse
import base64
import itertools
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_TOKENS = 128


class PhaseTimes:
    """Wraps a batch's ``prefill`` and ``decode``: their count and host seconds, from ``reset()`` on."""

    def __init__(self, batch):
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.calls = {"prefill": 0, "decode": 0}
        for name in self.seconds:
            setattr(batch, name, self._timed(name, getattr(batch, name)))

    def _timed(self, name: str, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)


def jpeg(seed: int) -> bytes:
    from service.smoke import _image_url

    return base64.b64decode(_image_url("jpeg", seed).split(",", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--threads", default="1,16", help="torch intra-op threads for the bursts prepared in threads")
    args, engine_flags = parser.parse_known_args(argv)
    import torch

    from bench.engine_mode import engine_token_stream, measure_streams
    from service.__main__ import settings_from_args
    from service.api.media import decode_image
    from service.engine import Engine
    from service.smoke import PROMPT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(["--model", args.checkpoint, *engine_flags])
    engine = Engine.load(settings)
    engine.start()
    phases = PhaseTimes(engine.scheduler.batch)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    seeds = itertools.count(1000)

    def prepare(data: bytes):
        return engine.prepare(messages, [decode_image(data, settings)], max_tokens=MAX_TOKENS, temperature=0.0,
                              ignore_eos=True)

    def burst(n: int, threads: int | None) -> list:
        datas = [jpeg(next(seeds)) for _ in range(n)]
        if threads is None:
            ready = [prepare(d) for d in datas]
            opener = lambda i: engine_token_stream(engine, ready[i])  # noqa: E731
        else:
            torch.set_num_threads(threads)  # the burst's threads are new: they take this count
            opener = lambda i: engine_token_stream(engine, prepare(datas[i]))  # noqa: E731
        phases.reset()
        result = measure_streams(opener, n)
        label = "beforehand" if threads is None else f"in its thread, {threads} torch thread(s)"
        return [n, label, f"{result.aggregate_tok_s:.0f}", f"{result.median_ttft_s:.3f}",
                f"{phases.calls['prefill']} / {phases.seconds['prefill']:.2f}",
                f"{phases.calls['decode']} / {phases.seconds['decode']:.2f}"]

    default_threads = torch.get_num_threads()  # the engine's own (one on a GPU)
    burst(2, None)  # the first requests' one-time work (kernels, workspaces) is not counted
    rows = []
    try:
        for n in (int(x) for x in args.concurrency.split(",")):
            rows.append(burst(n, None))
            for threads in (int(x) for x in args.threads.split(",")):
                rows.append(burst(n, threads))
            torch.set_num_threads(default_threads)
    finally:
        torch.set_num_threads(default_threads)
        engine.stop()
    header = ["at once", "prepared", "aggregate tok/s", "median TTFT (s)", "prefill passes / s", "decode launches / s"]
    lines = [f"engine alone: {args.checkpoint}, {' '.join(engine_flags) or 'default settings'}; each request its own "
             f"1280x704 JPEG, {MAX_TOKENS} new tokens"]
    if engine.plan is not None:
        lines.append(f"memory plan: {engine.plan.describe()}")
    lines += ["", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "engine_burst.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
