"""Where the HTTP path's time goes before the engine, for the smoke run's request: one 1280x704
random-noise PNG as a base64 data URL (3.6 MB) + ~40 text tokens, streamed. CPU, tiny model.

    python -m bench.http_overhead [--runs 15] [--model TINY_CHECKPOINT] [--baseline HEAD]

1. Each stage in-process, median of --runs: the openai SDK building the request, the server reading
   the body, json.loads, pydantic validation, the data URL to bytes, PIL decode, engine.prepare
   (chat template + image processor), and the stream's work per SSE chunk.
2. End to end: the real uvicorn server in a child process on 127.0.0.1, driven by the openai SDK.
   The child records when the handler was entered, the body read, engine.prepare started and ended
   and engine.submit was called (CLOCK_MONOTONIC is system-wide: client and server clocks agree),
   and the longest a thread waking every 0.2 ms waited for the GIL meanwhile (as the engine would).
   Then --concurrency streams at once: aggregate tokens/s, and the event loop thread's CPU per token.

--baseline REF also times the HTTP layer as it is at git REF (service/api/, or service/api.py,
media.py and protocol.py before that was a package), interleaved run by run with the working tree's
(a second server for the end-to-end part): a shared or throttled CPU drifts by 2x over seconds, so
only interleaved runs compare. The event loop is asyncio's, as in
the image (which has no uvloop); --loop uvloop tries the other.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "bench"
CONCURRENT_ROUNDS = 3


def _settings(model: str, **kwargs):
    from service.settings import ServiceSettings

    return ServiceSettings(model=model, served_model_name=MODEL_NAME, device="cpu", max_model_len=2048,
                           cuda_graphs=False, compile=False, **kwargs)


def _request_body(url: str, max_tokens: int) -> dict:
    from service.smoke import PROMPT

    return {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": PROMPT}]}]}


def _is_http(name: str) -> bool:
    return name in ("service.api", "service.media", "service.protocol") or name.startswith("service.api.")


class HttpLayer:
    """One version of the HTTP layer, as the bench drives it: either layout (service/api/ the package,
    or the single service/api.py with service/media.py and service/protocol.py before it)."""

    def __init__(self, modules: dict[str, types.ModuleType]):
        self.modules = modules
        self.packaged = "service.api.routes" in modules
        prefix = "service.api." if self.packaged else "service."
        self.api = modules["service.api"]
        self.media = modules[prefix + "media"]
        self.ChatCompletionRequest = modules[prefix + "protocol"].ChatCompletionRequest

    @property
    def _body_reader(self) -> tuple[types.ModuleType, str]:
        return (self.modules["service.api.routes"], "read_body") if self.packaged else (self.api, "_read_body")

    def read_body(self, request, limit: int):
        module, name = self._body_reader
        return getattr(module, name)(request, limit)

    def wrap_read_body(self, wrap) -> None:
        """Replace the body reader the chat route calls with wrap(original)."""
        module, name = self._body_reader
        setattr(module, name, wrap(getattr(module, name)))

    def check_and_convert(self, chat, settings) -> tuple[list[dict], list[str]]:
        if self.packaged:
            if hasattr(chat, "check_supported"):  # before the fields were checked while parsing
                chat.check_supported()
            return chat.chat_messages()
        self.api._check_supported(chat, settings)
        return self.api._to_chat_messages(chat)

    def stream(self, handle, request_id: str, model: str, include_usage: bool, metrics):
        if self.packaged:
            return self.modules["service.api.serving"].stream_chunks(handle, request_id, model, include_usage, metrics)
        return self.api._stream(handle, types.SimpleNamespace(id=request_id), model, include_usage, metrics)


def current_layer() -> HttpLayer:
    importlib.import_module("service.api")
    return HttpLayer({name: module for name, module in sys.modules.items() if _is_http(name)})


def load_baseline(ref: str) -> HttpLayer:
    """The HTTP layer at git `ref`, beside the working tree's: its files extracted to a temporary
    directory and imported under their own names (the rest of service/, the engine included, stays
    the working tree's), then sys.modules put back as it was."""
    import service
    import service.engine  # noqa: F401 - the shared modules come from the working tree: load them first
    import service.errors  # noqa: F401
    import service.metrics  # noqa: F401
    import service.settings  # noqa: F401

    current_layer()
    tree = Path(tempfile.mkdtemp(prefix="vlkit-http-baseline-"))
    atexit.register(shutil.rmtree, tree, True)
    archive = subprocess.run(["git", "archive", ref, "service"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_http(name)}
    saved_path = list(service.__path__)
    service.__path__[:] = [str(tree / "service")] + saved_path
    try:
        importlib.import_module("service.api")
        return HttpLayer({name: module for name, module in sys.modules.items() if _is_http(name)})
    finally:
        service.__path__[:] = saved_path
        for name in [name for name in sys.modules if _is_http(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        service.api = saved["service.api"]


# ---- 1. stages in-process ------------------------------------------------------------------------


def _timed(fns: list, runs: int) -> list[float]:
    """Median seconds of each fn() over `runs` rounds, the fns interleaved within each round."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for i in range(runs):
        order = list(range(len(fns)))[::(-1) ** i]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t)
    return [statistics.median(s) for s in samples]


def _client_build(url: str) -> tuple:
    """A call of the openai SDK up to the moment the transport holds the encoded request."""
    import httpx
    from openai import OpenAI

    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((time.perf_counter(), len(request.read())))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"data: [DONE]\n\n")

    client = OpenAI(base_url="http://bench/v1", api_key="unused", max_retries=0,
                    http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    messages = _request_body(url, 8)["messages"]
    elapsed: list[float] = []

    def call() -> None:
        t = time.perf_counter()
        for _chunk in client.chat.completions.create(
                model=MODEL_NAME, max_tokens=8, temperature=0, stream=True, messages=messages,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            pass
        elapsed.append(sent[-1][0] - t)

    call()
    return call, elapsed, sent[-1][1]


def _read_body(layer: HttpLayer, body: bytes, limit: int):
    """The route's body reader over ASGI receive() messages of 64 KiB, in a fresh event loop."""
    from starlette.requests import Request

    step = 64 * 1024

    async def once() -> None:
        chunks = [body[i:i + step] for i in range(0, len(body), step)]

        async def receive() -> dict:
            data = chunks.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(chunks)}

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"content-length", str(len(body)).encode())]}
        await layer.read_body(Request(scope, receive), limit)

    loop = asyncio.new_event_loop()
    return lambda: loop.run_until_complete(once())


N_CHUNKS = 2000


def _stream(layer: HttpLayer, model: str):
    """All of the SSE stream for N_CHUNKS events, in a fresh event loop."""
    from service.engine import Event
    from service.metrics import ServiceMetrics

    texts = [" word", " \u00e9t\u00e9", ' "quoted"', "\n", " \U0001F600"]

    class Handle:
        cancelled = False

        def cancel(self) -> None:
            pass

        async def __aiter__(self):
            for i in range(N_CHUNKS - 1):
                yield Event(text=texts[i % 5], prompt_tokens=40, completion_tokens=i + 1)
            yield Event(text="", finish_reason="length", prompt_tokens=40, completion_tokens=N_CHUNKS)

    metrics = ServiceMetrics()

    async def drain() -> None:
        async for _ in layer.stream(Handle(), "chatcmpl-0123456789abcdef", model, True, metrics):
            pass

    loop = asyncio.new_event_loop()
    return lambda: loop.run_until_complete(drain())


def stage_rows(model_dir: str, runs: int, baseline: str | None) -> list[tuple]:
    from service.engine import Engine
    from service.smoke import _image_url

    settings = _settings(model_dir, warmup=False)
    url = _image_url()
    body = json.dumps(_request_body(url, 128)).encode()
    payload = json.loads(body)
    versions = [current_layer()] + ([load_baseline(baseline)] if baseline else [])
    now = versions[0]
    chat = now.ChatCompletionRequest.model_validate(payload)
    messages, urls = now.check_and_convert(chat, settings)
    data = now.media.fetch_image_bytes(urls[0], settings)
    image = now.media.decode_image(data, settings)
    engine = Engine.load(settings)
    prompt_tokens = engine.prepare(messages, [image], max_tokens=128).prompt.length
    chats = {id(v): v.ChatCompletionRequest.model_validate(payload) for v in versions}

    def each(make) -> list[float]:  # one time per version, interleaved
        return _timed([make(layer) for layer in versions], runs)

    def shared(fn) -> list[float]:  # code that no version changes
        return _timed([fn], runs) * len(versions)

    client_call, client_times, wire_bytes = _client_build(url)
    _timed([client_call], runs)
    stages = [
        ("client: openai SDK builds the request", [statistics.median(client_times[-runs:])] * len(versions)),
        ("server: read the body (64 KiB receives)", each(lambda v: _read_body(v, body, settings.max_request_bytes))),
        ("server: json.loads", shared(lambda: json.loads(body))),
        ("server: ChatCompletionRequest validation",
         each(lambda v: lambda: v.ChatCompletionRequest.model_validate(payload))),
        ("server: checks + chat messages", each(lambda v: lambda: v.check_and_convert(chats[id(v)], settings))),
        ("server: data URL -> bytes (base64)", each(lambda v: lambda: v.media.fetch_image_bytes(urls[0], settings))),
        ("server: decode_image (PIL PNG decode)", each(lambda v: lambda: v.media.decode_image(data, settings))),
        (f"server: engine.prepare ({type(engine.processor.image_processor).__name__})",
         shared(lambda: engine.prepare(messages, [image], max_tokens=128))),
    ]
    server = [sum(times[k] for name, times in stages if name.startswith("server")) for k in range(len(versions))]
    chunk = each(lambda v: _stream(v, MODEL_NAME))
    rows = [(f"request: {wire_bytes / 1e6:.2f} MB body, {prompt_tokens} prompt tokens", *[""] * len(versions))]
    rows += [(name, *[f"{s * 1e3:.2f} ms" for s in times]) for name, times in stages]
    rows += [("server: sum of the stages above", *[f"{s * 1e3:.2f} ms" for s in server]),
             ("SSE: the stream's work per chunk", *[f"{s / N_CHUNKS * 1e6:.1f} us" for s in chunk])]
    return rows


# ---- 2. end to end through uvicorn ---------------------------------------------------------------


def serve(model_dir: str, port: int, baseline: str | None, loop: str) -> None:
    """The child: the real app under uvicorn, with marks at the handler's stages on GET /bench/marks."""
    import uvicorn

    from service.engine import Engine

    layer = load_baseline(baseline) if baseline else current_layer()

    settings = _settings(model_dir, host="127.0.0.1", port=port)
    engine = Engine.load(settings)
    marks: dict[str, float] = {}
    submit, prepare = engine.submit, engine.prepare
    gil_wait = [0.0]

    def ticker() -> None:  # stands for the engine's thread: how long can it wait for the GIL?
        last = time.perf_counter()
        while True:
            time.sleep(0.0002)
            now = time.perf_counter()
            gil_wait[0] = max(gil_wait[0], now - last - 0.0002)
            last = now

    threading.Thread(target=ticker, daemon=True).start()

    def timed_submit(request, loop=None, arrived=None):
        marks.update(arrived=arrived, submit=time.monotonic(), gil_wait=gil_wait[0])
        return submit(request, loop, arrived)

    def timed_prepare(*args, **kwargs):
        marks["prepare_start"] = time.monotonic()
        try:
            return prepare(*args, **kwargs)
        finally:
            marks["prepare_end"] = time.monotonic()

    def timed(read_body):
        async def timed_read_body(*args, **kwargs):
            gil_wait[0] = 0.0
            try:
                return await read_body(*args, **kwargs)
            finally:
                marks["body_read"] = time.monotonic()

        return timed_read_body

    engine.submit, engine.prepare = timed_submit, timed_prepare
    layer.wrap_read_body(timed)
    app = layer.api.create_app(settings, engine)

    @app.get("/bench/marks")
    async def get_marks() -> dict:
        return dict(marks)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop=loop)


def _stream_once(client, messages: list, max_tokens: int) -> dict:
    start = time.monotonic()
    first = None
    tokens = 0
    for chunk in client.chat.completions.create(
            model=MODEL_NAME, max_tokens=max_tokens, temperature=0, stream=True, messages=messages,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.monotonic()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"start": start, "first": first, "tokens": tokens}


def _loop_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (the one running uvicorn's event loop), from /proc."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def e2e_rows(model_dir: str, runs: int, concurrency: int, baseline: str | None, loop: str) -> list[tuple]:
    import httpx
    from openai import OpenAI

    from service.readiness import wait_ready
    from service.smoke import _image_url

    servers = []
    try:
        for ref in [None] + ([baseline] if baseline else []):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            command = [sys.executable, "-m", "bench.http_overhead", "--serve", str(port), "--model", model_dir,
                       "--loop", loop] + (["--baseline", ref] if ref else [])
            servers.append((subprocess.Popen(command, cwd=ROOT), f"http://127.0.0.1:{port}"))
        for proc, base in servers:
            if not wait_ready(base, 300, alive=lambda: proc.poll() is None):
                raise SystemExit(f"a bench server exited with {proc.returncode}")
        clients = [OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
                   for _, base in servers]
        image_messages = _request_body(_image_url(), 8)["messages"]
        keys = ("arrival", "body", "parse", "prepare", "submit", "handler", "engine", "ttft", "gil")
        samples = [{k: [] for k in keys} for _ in servers]
        for i in range(runs + 1):
            for k in list(range(len(servers)))[::(-1) ** i]:
                r = _stream_once(clients[k], image_messages, 8)
                m = httpx.get(servers[k][1] + "/bench/marks").json()
                if i == 0:
                    continue  # the first request of each: not counted
                for key, value in zip(keys, (
                        m["arrived"] - r["start"], m["body_read"] - m["arrived"], m["prepare_start"] - m["body_read"],
                        m["prepare_end"] - m["prepare_start"], m["submit"] - m["prepare_end"],
                        m["submit"] - m["arrived"], r["first"] - m["submit"], r["first"] - r["start"],
                        m["gil_wait"])):
                    samples[k][key].append(value)
                time.sleep(0.05)
        throughput = [[] for _ in servers]
        loop_cpu = [[] for _ in servers]

        def many(client, messages: list, max_tokens: int) -> int:
            with ThreadPoolExecutor(concurrency) as pool:
                done = pool.map(lambda _: _stream_once(client, messages, max_tokens), range(concurrency))
                return sum(r["tokens"] for r in done)

        for i in range(CONCURRENT_ROUNDS if concurrency > 1 else 0):
            for k in list(range(len(servers)))[::(-1) ** i]:
                t = time.monotonic()
                tokens = many(clients[k], _request_body(_image_url(), 128)["messages"], 128)
                throughput[k].append(tokens / (time.monotonic() - t))
                # Text only, so that the loop thread's CPU is the streaming's, not parsing 8 images.
                cpu = _loop_thread_cpu_s(servers[k][0].pid)
                tokens = many(clients[k], [{"role": "user", "content": "Hello"}], 256)
                loop_cpu[k].append((_loop_thread_cpu_s(servers[k][0].pid) - cpu) / tokens)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(60)

    def ms(key: str) -> list[str]:
        return [f"{statistics.median(s[key]) * 1e3:.1f} ms ({min(s[key]) * 1e3:.0f}-{max(s[key]) * 1e3:.0f})"
                for s in samples]

    rows = [("e2e: client start -> handler entered", *ms("arrival")),
            ("e2e: handler entered -> body read", *ms("body")),
            ("e2e: body read -> prepare starts (parse, image)", *ms("parse")),
            ("e2e: engine.prepare", *ms("prepare")),
            ("e2e: prepare done -> engine.submit", *ms("submit")),
            ("e2e: handler entered -> engine.submit", *ms("handler")),
            ("e2e: engine.submit -> 1st token at the client", *ms("engine")),
            ("e2e: TTFT at the client", *ms("ttft")),
            ("e2e: longest GIL wait of another thread, body read -> submit", *ms("gil"))]
    if concurrency > 1:
        rows += [(f"e2e: {concurrency} streams x 128 tokens, aggregate",
                  *[f"{statistics.median(t):.0f} tok/s ({min(t):.0f}-{max(t):.0f})" for t in throughput]),
                 (f"e2e: {concurrency} text streams, loop thread CPU per token",
                  *[f"{statistics.median(c) * 1e6:.0f} us ({min(c) * 1e6:.0f}-{max(c) * 1e6:.0f})" for c in loop_cpu])]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--model", help="a tiny checkpoint (python -m service.tiny_model DIR); built when absent")
    parser.add_argument("--baseline", metavar="REF", help="also time the HTTP layer as it is at git REF")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.model, args.serve, args.baseline, args.loop)
        return 0
    model = args.model
    if model is None or not (Path(model) / "config.json").is_file():
        from service.tiny_model import build_checkpoint

        model = str(build_checkpoint(Path(model or tempfile.mkdtemp(prefix="vlkit-tiny-"))))
    rows = stage_rows(model, args.runs, args.baseline)
    if not args.skip_e2e:
        rows += e2e_rows(model, args.runs, args.concurrency, args.baseline, args.loop)
    header = (f"stage (median of {args.runs})", "now") + ((f"at {args.baseline}",) if args.baseline else ())
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(f"{cell:{w}s}" for cell, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
