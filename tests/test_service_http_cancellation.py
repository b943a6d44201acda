"""How a request ends early, past the cases of test_service_api.py (client gone before its stream,
mid-stream, while waiting for a whole answer): the server shutting down with requests running and
queued, and a client gone while it still sends its body. The real app, engine and tiny model throughout."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.engine_faults import slow_decode


@pytest.fixture
def own_server(tiny_model_dir):
    """Start a server of its own (shutting it down is the test): `own_server(grace_s, **settings)`."""
    from service.api import create_app
    from service.engine import Engine
    from service.http_limits import uvicorn_server
    from service.readiness import wait_ready
    from service.settings import ServiceSettings

    started = []

    def start(grace_s: float, **overrides):
        settings = ServiceSettings(**{**dict(model=str(tiny_model_dir), served_model_name="tiny", host="127.0.0.1",
                                             port=free_port(), max_model_len=512, max_tokens_default=32,
                                             warmup=False, log_level="error"), **overrides})
        engine = Engine.load(settings)
        server = uvicorn_server(create_app(settings, engine), settings, grace_s=grace_s)
        thread = threading.Thread(target=server.run, name="uvicorn-own", daemon=True)
        thread.start()
        base = f"http://{settings.host}:{settings.port}"
        assert wait_ready(base, 60, poll=0.05)
        started.append((server, thread))
        return base, server, thread, engine

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(30)


def answer(base: str, stream: bool, max_tokens: int, outcomes: dict, name: str) -> None:
    """POST a chat request; outcomes[name]: (status, the last SSE data lines or the JSON body, when it ended)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"an answer for {name}"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as response:
            if stream and response.status_code == 200:
                data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                outcomes[name] = (200, data, time.monotonic())
            else:
                outcomes[name] = (response.status_code, json.loads(response.read()), time.monotonic())
    except httpx.HTTPError as exc:
        outcomes[name] = (type(exc).__name__, None, time.monotonic())


def in_threads(*calls) -> list[threading.Thread]:
    threads = [threading.Thread(target=call, args=args) for call, *args in calls]
    for thread in threads:
        thread.start()
    return threads


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def shut_down(server, thread, clients: list[threading.Thread]) -> None:
    """What SIGTERM does to the server (uvicorn's handler sets should_exit); until it and its clients end."""
    server.should_exit = True
    for client in clients:
        client.join(30)
    thread.join(30)
    assert not thread.is_alive()


def test_shutdown_refuses_the_queued_requests_at_once_and_lets_the_running_one_finish(own_server):
    """SIGTERM with one request running and two queued: the queued ones get 503 at once (streamed:
    an error event, then [DONE]), the running one finishes its whole answer, then the server exits."""
    base, server, thread, engine = own_server(30, max_batch_size=1)
    slow_decode(engine, 0.01)  # the running answer takes a second at least, on any machine
    outcomes: dict = {}
    clients = in_threads((answer, base, True, 100, outcomes, "running"))
    wait_for(lambda: engine.running == 1)
    clients += in_threads((answer, base, True, 100, outcomes, "queued stream"),
                          (answer, base, False, 100, outcomes, "queued"))
    wait_for(lambda: engine.queue_depth == 2)
    shut_down(server, thread, clients)
    status, data, finished = outcomes["running"]
    assert status == 200 and data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    status, body, refused = outcomes["queued"]
    assert status == 503 and "shutting down" in body["error"]["message"]
    status, data, refused_stream = outcomes["queued stream"]
    assert status == 200 and data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == 503
    assert max(refused, refused_stream) < finished  # refused at once, not after the running one
    assert engine.queue_depth == 0 and engine.running == 0 and not engine.ready


def test_shutdown_ends_the_answers_still_running_after_the_grace_with_503(own_server):
    """Past the shutdown's grace, what still runs ends with a clean 503 (streamed: an error event, then
    [DONE]), not a bare 500 or a stream cut off mid-chunk; the KV cache is all free again."""
    base, server, thread, engine = own_server(0.3, max_batch_size=2)
    slow_decode(engine, 0.01)  # 400 tokens: four seconds at least
    outcomes: dict = {}
    clients = in_threads((answer, base, True, 400, outcomes, "stream"), (answer, base, False, 400, outcomes, "whole"))
    wait_for(lambda: engine.running == 2)
    shut_down(server, thread, clients)
    status, data, _ = outcomes["stream"]
    assert status == 200 and data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    status, body, _ = outcomes["whole"]
    assert status == 503 and "shutting down" in body["error"]["message"]
    cache = engine.scheduler.batch.cache
    assert engine.running == 0 and cache.free_slots == cache.num_slots and cache.free_blocks == cache.num_blocks


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
