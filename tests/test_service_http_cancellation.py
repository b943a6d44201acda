"""How a request ends early, past the cases of test_service_api.py (client gone before its stream,
mid-stream, while waiting for a whole answer): the server shutting down with requests in flight, and a
client gone while it still sends its body. The real app, engine and tiny model throughout."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.conftest import free_port


@pytest.fixture
def own_server(tiny_model_dir):
    """A server of its own (shutting it down is the test), with a short graceful-shutdown timeout."""
    import uvicorn

    from service.api import create_app
    from service.engine import Engine
    from service.readiness import wait_ready
    from service.settings import ServiceSettings

    settings = ServiceSettings(model=str(tiny_model_dir), served_model_name="tiny", host="127.0.0.1",
                               port=free_port(), max_model_len=512, max_tokens_default=32, warmup=False)
    engine = Engine.load(settings)
    app = create_app(settings, engine)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="critical",
                                           timeout_graceful_shutdown=0.5))
    thread = threading.Thread(target=server.run, name="uvicorn-own", daemon=True)
    thread.start()
    base = f"http://{settings.host}:{settings.port}"
    assert wait_ready(base, 60, poll=0.05)
    yield base, server, thread, engine
    server.should_exit = True
    thread.join(30)


def cancelled_count(engine) -> float:
    return engine.metrics.registry.get_sample_value(
        "vllm:request_success_total",
        {"finished_reason": "abort", "model_name": engine.metrics.model_name, "engine": "0"}) or 0.0


def test_shutdown_cancels_the_requests_it_cuts_off(own_server):
    """uvicorn lets running requests finish for its graceful timeout, then cancels their tasks: both a
    stream and a request waiting for its whole answer leave the engine's queue as cancelled (the
    engine's own stop would drop them without counting them)."""
    base, server, thread, engine = own_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 400}
    outcomes: list[str] = []

    def post(stream: bool) -> None:
        try:
            with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": stream},
                              timeout=30) as response:
                lines = [line for line in response.iter_lines() if line]
            outcomes.append("done" if lines and lines[-1] == "data: [DONE]" else f"status {response.status_code}")
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    before = cancelled_count(engine)
    with engine.paused():  # both stay queued: only a cancellation takes them out
        clients = [threading.Thread(target=post, args=(stream,)) for stream in (True, False)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while engine.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queue_depth == 2
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()
    for client in clients:
        client.join(30)
    assert cancelled_count(engine) == before + 2
    assert engine.queue_depth == 0 and engine.running == 0
    assert len(outcomes) == 2 and "done" not in outcomes, outcomes  # neither got a complete answer
    assert not engine.ready  # and the lifespan stopped the engine afterwards


def total(registry, name: str) -> float:
    """A counter summed over its labels."""
    return sum(s.value for m in registry.collect() if m.name == name for s in m.samples if s.name.endswith("_total"))


def asgi_scope(body_length: int) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(body_length).encode())]}


def test_a_client_gone_while_sending_its_body_is_not_an_error(server):
    """Half a body, then the disconnect: nothing is submitted, nothing is counted as an internal error."""
    body = json.dumps({"model": "tiny-qwen3-vl", "messages": [{"role": "user", "content": "hi"}]}).encode()
    scope = asgi_scope(len(body))
    scope["headers"].append((b"authorization", f"Bearer {server.settings.api_key}".encode()))
    messages = [{"type": "http.request", "body": body[:10], "more_body": True}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    registry = server.metrics.registry
    errors_before, requests_before = total(registry, "vlkit_request_errors"), total(registry, "vllm:request_success")
    asyncio.run(server.app(scope, receive, send))
    assert sent[0]["status"] == 499  # nginx's "client closed request": nobody reads it
    assert json.loads(sent[1]["body"])["error"]["type"] == "ClientClosedRequest"
    assert total(registry, "vlkit_request_errors") == errors_before
    assert total(registry, "vllm:request_success") == requests_before
