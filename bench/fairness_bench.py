"""What one request's hostile or heavy parameters cost it and its neighbours, on the real server.

    python -m bench.fairness_bench                                  # tiny random model, CPU (a minute)
    python -m bench.fairness_bench --shape 2b --device cuda         # Qwen3-VL-2B shapes, random weights, GPU

Prints a table: a small neighbour request's latency (median and worst of --probes) while nothing
else runs, while a 50 MB prompt is refused, while a request with the most stop strings the server
takes generates, and while a request with every logits processor generates; then decode
throughput of a batch of 8 with and without one such row.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

NEIGHBOUR = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
STOPS = [f"{i:03d}" + "q" * 60 for i in range(256)]  # the cap: 256 strings, 16 K characters
PROCESSORS = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": {"77": 2},
              "bad_words": ["street", "the tram"], "min_tokens": 8, "logprobs": True, "top_logprobs": 5}


def probe(base: str, count: int) -> tuple[float, float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        httpx.post(base + "/v1/chat/completions", json=NEIGHBOUR, timeout=300).raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times)


def beside(base: str, body: dict, probes: int) -> tuple[float, float, float, int]:
    """The neighbour's latency while `body` runs; and that request's own time and status."""
    result = {}

    def heavy():
        started = time.perf_counter()
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=600)
        result.update(seconds=time.perf_counter() - started, status=response.status_code)

    thread = threading.Thread(target=heavy)
    thread.start()
    time.sleep(0.05)
    median, worst = probe(base, probes)
    thread.join()
    return median, worst, result["seconds"], result["status"]


def decode_rate(engine, heavy_row: bool, tokens: int) -> float:
    from service.engine import Engine  # noqa: F401 - the engine's types

    def request(extra: dict):
        return engine.prepare([{"role": "user", "content": [{"type": "text", "text": "Describe the street."}]}], [],
                              max_tokens=tokens, temperature=0.0, ignore_eos=True, **extra)

    extra = {k: v for k, v in PROCESSORS.items() if k not in ("logprobs", "top_logprobs", "logit_bias")}
    extra.update(logit_bias={77: 2.0}, logprobs=5, bad_words=tuple(extra["bad_words"]))
    requests = [request(extra if heavy_row and i == 0 else {}) for i in range(8)]
    with engine.paused():
        handles = [engine.submit(r) for r in requests]
    started = time.perf_counter()
    for handle in handles:
        list(handle)
    return 8 * tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    from service.api import create_app
    from service.http_limits import uvicorn_server
    from service.readiness import wait_ready
    from service.settings import ServiceSettings
    from service.tiny_model import build_checkpoint
    from tests.conftest import free_port

    workdir = Path(tempfile.mkdtemp(prefix="vlkit-fairness-"))
    model = build_checkpoint(workdir / "model", shape=args.shape, device=None if args.shape == "tiny" else args.device)
    settings = ServiceSettings(model=str(model), device=args.device, port=free_port(), log_level="warning",
                               max_model_len=2048, warmup=True)
    app = create_app(settings)
    server = uvicorn_server(app, settings)
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{settings.port}"
    assert wait_ready(base, 600), app.state.service.load_error
    rows = [("neighbour alone", *probe(base, args.probes), None, None)]
    huge = {**NEIGHBOUR, "messages": [{"role": "user", "content": "word " * 10_000_000}]}  # 50 MB
    rows.append(("beside a 50 MB prompt", *beside(base, huge, args.probes)))
    stops = {**NEIGHBOUR, "max_tokens": args.tokens, "ignore_eos": True, "stop": STOPS}
    rows.append((f"beside 256 stop strings, {args.tokens} tokens", *beside(base, stops, args.probes)))
    heavy = {**NEIGHBOUR, "max_tokens": args.tokens, "ignore_eos": True, **PROCESSORS}
    rows.append((f"beside every processor, {args.tokens} tokens", *beside(base, heavy, args.probes)))
    plain = {**NEIGHBOUR, "max_tokens": args.tokens, "ignore_eos": True}
    rows.append((f"beside a plain request, {args.tokens} tokens", *beside(base, plain, args.probes)))
    print(f"{'case':44s} {'neighbour p50':>14s} {'worst':>8s} {'its own':>9s} status")
    for name, median, worst, own, status in rows:
        own_text = "" if own is None else f"{own:8.2f}s"
        print(f"{name:44s} {median * 1000:12.1f}ms {worst * 1000:6.0f}ms {own_text:>9s} {status or ''}")
    engine = app.state.service.engine
    plain_rate, heavy_rate = decode_rate(engine, False, args.tokens), decode_rate(engine, True, args.tokens)
    print(f"\ndecode, batch of 8: {plain_rate:.0f} tok/s plain, {heavy_rate:.0f} tok/s with one row using every "
          f"processor ({heavy_rate / plain_rate:.0%})")
    server.should_exit = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
