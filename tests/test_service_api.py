"""The real server (uvicorn on 127.0.0.1, tiny random Qwen3-VL) driven by the official openai SDK."""
from __future__ import annotations

import base64
import contextlib
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.conftest import API_KEY, SERVED_NAME, png_data_url
from tests.engine_faults import fail_next_forward


def ask(client, content, **kwargs):
    kwargs.setdefault("model", SERVED_NAME)
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kwargs)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def assert_still_serves(server) -> None:
    """After any bad request: a normal request gets a normal answer."""
    reply = ask(server.client(), [image_part(png_data_url()), {"type": "text", "text": "still there?"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1


def metric(server, name: str, **labels: str) -> float:
    """The sum of the samples of `name` on /metrics whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black: tiny on disk, huge when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---- answers ---------------------------------------------------------------------------------------


def test_text_only(server):
    reply = ask(server.client(), "Say something about the weather.", max_tokens=12)
    assert reply.model == SERVED_NAME
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_one_image_adds_image_tokens(server):
    client = server.client()
    text_only = ask(client, [{"type": "text", "text": "Describe the image."}])
    with_image = ask(client, [image_part(png_data_url(128, 96)), {"type": "text", "text": "Describe the image."}])
    # 128x96 is resized to a 128x96 patch grid of 16 px, merged 2x2: 4*3 = 12 image tokens + start/end.
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 12 + 2
    assert with_image.choices[0].message.content is not None


def test_two_images_in_every_supported_format(server):
    client = server.client()
    parts = [image_part(png_data_url(64, 64, (10, 200, 10), "JPEG")), image_part(png_data_url(64, 64, fmt="WEBP")),
             {"type": "text", "text": "Compare the two pictures."}]
    two = ask(client, parts)
    one = ask(client, parts[1:])
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == 4 + 2  # 64x64 -> 2x2 merged tokens
    for fmt in ("GIF", "BMP", "TIFF"):  # a Windows screenshot tool's BMP, a scanner's TIFF
        other = ask(client, [image_part(png_data_url(64, 64, fmt=fmt)), *parts[2:]])
        assert other.usage.prompt_tokens == one.usage.prompt_tokens, fmt


def test_local_file_under_allowed_dir(server, media_dir):
    reply = ask(server.client(), [image_part(f"file://{media_dir / 'blue.png'}"), {"type": "text", "text": "color?"}])
    plain = ask(server.client(), [image_part(str(media_dir / "blue.png")), {"type": "text", "text": "color?"}])
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
    assert reply.choices[0].message.content == plain.choices[0].message.content


def test_stream_equals_non_stream_and_reports_usage(server):
    client = server.client()
    content = [image_part(png_data_url()), {"type": "text", "text": "Stream this."}]
    full = ask(client, content, max_tokens=20)
    chunks = list(ask(client, content, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_ends_with_done_marker(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_max_tokens_and_max_completion_tokens_give_length(server):
    client = server.client()
    a = ask(client, "count", max_tokens=5)
    b = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "count"}],
                                       max_completion_tokens=5, temperature=0)
    assert a.choices[0].finish_reason == b.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == b.usage.completion_tokens == 5
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_string_cuts_the_answer(server):
    client = server.client()
    full = ask(client, "Tell me a story.", max_tokens=32).choices[0].message.content
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    expected = full[:full.index(stop)]
    reply = ask(client, "Tell me a story.", max_tokens=32, stop=[stop, "never-appears-xyz"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == expected
    streamed = ask(client, "Tell me a story.", max_tokens=32, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    a = ask(client, "Pick words.", temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    b = ask(client, "Pick words.", temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_eight_concurrent_requests_are_batched(server):
    client = server.client()
    steps_before = metric(server, "vlkit_batch_size_count")
    single_steps_before = metric(server, "vlkit_batch_size_bucket", le="1.0")
    prompts = [f"Request number {i}: describe." for i in range(8)]
    alone = [ask(client, [image_part(png_data_url(64 + 16 * i, 64)), {"type": "text", "text": p}], max_tokens=24)
             for i, p in enumerate(prompts)]

    def one(i):
        return ask(client, [image_part(png_data_url(64 + 16 * i, 64)), {"type": "text", "text": prompts[i]}],
                   max_tokens=24)

    server.engine.scheduler.max_batch_seen = 0
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert server.engine.scheduler.max_batch_seen >= 2
    steps = metric(server, "vlkit_batch_size_count") - steps_before
    single_steps = metric(server, "vlkit_batch_size_bucket", le="1.0") - single_steps_before
    assert steps - single_steps > 0  # some decode steps ran several requests at once


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert httpx.get(server.base_url + "/health").status_code == 200
    ready = httpx.get(server.base_url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_count_tokens_and_latency(server):
    before = metric(server, "vllm:generation_tokens_total")
    ttft_before = metric(server, "vllm:time_to_first_token_seconds_count")
    ask(server.client(), "metrics please", max_tokens=6)
    assert metric(server, "vllm:generation_tokens_total") - before == 6
    assert metric(server, "vllm:time_to_first_token_seconds_count") - ttft_before == 1
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("vllm:prompt_tokens_total", "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_waiting",
                 "vllm:request_success_total", "vllm:kv_cache_usage_perc", "vlkit_ready 1.0"):
        assert name in text
    assert f'model_name="{SERVED_NAME}"' in text


def test_metrics_count_only_clients_requests_not_the_warm_up(tiny_model_dir):
    """The start-up's warm-up request was counted as a client's: one request, its tokens, its latencies
    (vLLM's series start at zero)."""
    from service.settings import ServiceSettings
    from tests.conftest import free_port, start_server

    settings = ServiceSettings(model=str(tiny_model_dir), served_model_name=SERVED_NAME, port=free_port(),
                               max_model_len=256, min_pixels=3136, max_pixels=16384, log_level="warning")
    assert settings.warmup
    fresh, stop = start_server(settings)
    try:
        series = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                  "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                  "vllm:prefix_cache_queries_total", "vlkit_batch_size_count")
        assert {name: metric(fresh, name) for name in series} == dict.fromkeys(series, 0)
        # vLLM's series of every finished_reason from the start (its FinishReason: repetition too)
        for reason in ("stop", "length", "abort", "error", "repetition"):
            assert f'finished_reason="{reason}"' in httpx.get(fresh.base_url + "/metrics").text, reason
        reply = ask(fresh.client(api_key="unused"), "count me", max_tokens=3)
        assert metric(fresh, "vllm:request_success_total") == 1
        assert metric(fresh, "vllm:generation_tokens_total") == reply.usage.completion_tokens == 3
        assert metric(fresh, "vllm:prompt_tokens_total") == reply.usage.prompt_tokens
        assert metric(fresh, "vllm:time_to_first_token_seconds_count") == 1
    finally:
        stop()


# ---- errors: each one is answered in OpenAI's shape, and the server keeps serving ------------------


def raw_post(server, body: bytes | dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    return httpx.post(server.base_url + "/v1/chat/completions", content=body,
                      headers={**headers, "Content-Type": "application/json"}, timeout=60)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    return error


def user(content, **extra) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


BAD_REQUESTS = {
    "malformed json": (b'{"model": "x", "messages": [', 400, ["not valid JSON"]),
    "no messages": ({"model": SERVED_NAME, "messages": []}, 400, ["messages"]),
    "n above the batch": (user("hi", n=99, temperature=1), 400, ["n must be at most 8"]),
    "n with greedy sampling": (user("hi", n=2, temperature=0), 400, ["greedy"]),
    "unknown part type": (user([{"type": "video_url", "video_url": {"url": "x"}}]), 400, ["video_url"]),
    "non-image data url": (user([image_part("data:text/plain;base64," + base64.b64encode(b"hello").decode())]),
                           400, ["not an image"]),
    "garbage image bytes": (user([image_part("data:image/png;base64," + base64.b64encode(b"\x89PNG nope").decode())]),
                            400, ["not an image"]),
    "remote url refused": (user([image_part("https://example.com/cat.png")]), 400, ["remote image URLs are disabled"]),
    "file outside allowed dir": (user([image_part("file:///etc/hostname")]), 400, ["outside the allowed"]),
    "path escaping allowed dir": (user([image_part("../../../etc/hostname")]), 400, ["outside the allowed"]),
    "too many images": (user([image_part(png_data_url())] * 4), 400, ["at most 3 image"]),
    "temperature out of range": (user("hi", temperature=7), 400, ["temperature"]),
    "continue_final_message with the generation prompt": (user("hi", continue_final_message=True), 400,
                                                           ["continue_final_message", "add_generation_prompt"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_is_400_and_server_keeps_serving(server, case):
    body, status, words = BAD_REQUESTS[case]
    assert_error(raw_post(server, body), status, *words)
    assert_still_serves(server)


def test_unknown_model_is_404_like_vllm(server):
    with pytest.raises(openai.NotFoundError) as info:
        ask(server.client(), "hi", model="no-such-model")
    assert info.value.body["message"] == "The model `no-such-model` does not exist."
    assert info.value.body["type"] == "NotFoundError"
    assert_still_serves(server)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_400_like_vllm(server, content_type):
    """vLLM's validate_json_request: only application/json. A web page's form or text/plain POST (sent
    without a CORS preflight) cannot start a generation."""
    headers = {"Authorization": f"Bearer {API_KEY}", **({"Content-Type": content_type} if content_type else {})}
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}' % SERVED_NAME.encode()
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        assert_error(httpx.post(server.base_url + path, content=body, headers=headers), 400, "application/json")
    json_with_charset = {**headers, "Content-Type": "Application/JSON; charset=utf-8"}
    assert httpx.post(server.base_url + "/v1/chat/completions", content=body, headers=json_with_charset,
                      timeout=60).status_code == 200


def test_unknown_routes_and_methods_answer_in_vllms_error_shape(server):
    error = assert_error(httpx.get(server.base_url + "/v1/nope"), 404)
    assert error["type"] == "Not Found"  # vLLM's http_exception_handler: the status phrase
    error = assert_error(httpx.post(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}),
                         405)
    assert error["type"] == "Method Not Allowed"


def test_prompt_longer_than_context_names_both_lengths(server):
    """vLLM 0.27's words, parameter and value (its TokenizeParams checks): the prompt's tokens and
    the output tokens asked for against the context; max_tokens over the context alone."""
    long_text = "The quick brown fox jumps over the lazy dog. " * 120
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client(), long_text)
    error = info.value.body
    prompt_tokens = int(error["message"].split("your prompt contains ")[1].split()[0])
    assert prompt_tokens > 512 and error["param"] == "input_tokens" and error["type"] == "BadRequestError"
    assert error["message"] == (
        "This model's maximum context length is 512 tokens. However, you requested 8 output tokens and your prompt "
        f"contains {prompt_tokens} input tokens, for a total of {prompt_tokens + 8} tokens. Please reduce the length "
        f"of the input prompt or the number of requested output tokens. (parameter=input_tokens, value={prompt_tokens})")
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client(), "short", max_tokens=505)
    assert "you requested 505 output tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client(), "short", max_tokens=600)
    assert info.value.body["message"] == ("max_tokens=600 cannot be greater than max_model_len=max_total_tokens=512. "
                                          "Please request fewer output tokens. (parameter=max_tokens, value=600)")
    assert_still_serves(server)


def test_huge_image_is_refused_cheaply_with_413(server):
    bomb = bomb_png(20000, 20000)
    assert len(bomb) < 200_000  # the file is small; 400 million pixels when decoded
    started = time.monotonic()
    response = raw_post(server, user([image_part("data:image/png;base64," + base64.b64encode(bomb).decode())]))
    assert_error(response, 413, "20000x20000")
    assert time.monotonic() - started < 10  # refused from the header, not after decoding 400 MP
    assert_still_serves(server)


def test_image_over_byte_limit_and_request_over_size_are_413(server):
    big = base64.b64encode(b"\x00" * (3 * 1024 * 1024)).decode()
    assert_error(raw_post(server, user([image_part("data:image/png;base64," + big)])), 413, "bytes")
    huge_body = b'{"pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    assert_error(raw_post(server, huge_body), 413, "limit")
    assert_still_serves(server)


def test_api_key_is_required_but_health_is_open(server):
    with pytest.raises(openai.AuthenticationError):
        ask(server.client(api_key="wrong"), "hi")
    assert_error(raw_post(server, user("hi"), key=None), 401, "api key")
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    assert_still_serves(server)


@contextlib.contextmanager
def queue_filled(server, pool: ThreadPoolExecutor, max_tokens: int):
    """The engine paused and its queue full of `max_queue` requests sent from `pool` (yields their
    futures; they finish once the engine runs again)."""
    limit, client = server.settings.max_queue, server.client()
    with server.engine.paused():
        futures = [pool.submit(ask, client, f"queued {i}", max_tokens=max_tokens) for i in range(limit)]
        deadline = time.monotonic() + 30
        while server.engine.queue_depth < limit and time.monotonic() < deadline:
            time.sleep(0.01)
        yield futures


def test_full_queue_is_429_and_all_queued_requests_finish(server):
    limit = server.settings.max_queue
    client = server.client()
    for i in range(2):  # requests finished before: the pace the 429's Retry-After comes from
        ask(client, f"before {i}", max_tokens=2)
    with ThreadPoolExecutor(limit) as pool:
        with queue_filled(server, pool, max_tokens=4) as futures:
            assert metric(server, "vllm:num_requests_waiting") == limit
            with pytest.raises(openai.RateLimitError) as info:
                ask(client, "one too many")
            assert "queue is full" in info.value.body["message"]
            # The server has finished requests before: it says when to come back, from their pace.
            retry = int(info.value.response.headers["retry-after"])
            assert 1 <= retry <= 60 and f"retry in {retry} s" in info.value.body["message"]
        replies = [f.result(timeout=60) for f in futures]
    assert all(r.usage.completion_tokens == 4 for r in replies)
    assert server.engine.queue_depth == 0
    assert_still_serves(server)


def test_a_full_queue_refuses_before_preparing_the_request(server):
    """The 429 came only once the request was prepared (its grammar compiled, its images fetched and
    decoded): under overload every refused request still cost the server that work, and one whose
    image is no image got a 400 from decoding it. Now the queue is looked at first."""
    limit = server.settings.max_queue
    refused_before = metric(server, "vlkit_request_errors_total", kind="queue_full")
    not_an_image = user([image_part("data:image/png;base64," + base64.b64encode(b"no png at all").decode())])
    bad_regex = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2, "structured_outputs": {"regex": "(["}}
    with ThreadPoolExecutor(limit) as pool:
        with queue_filled(server, pool, max_tokens=2) as futures:
            assert_error(raw_post(server, not_an_image), 429, "queue is full")
            completion = httpx.post(server.base_url + "/v1/completions", json=bad_regex, timeout=60,
                                    headers={"Authorization": f"Bearer {API_KEY}"})
            assert_error(completion, 429, "queue is full")
        assert all(f.result(timeout=60).usage.completion_tokens == 2 for f in futures)
    assert metric(server, "vlkit_request_errors_total", kind="queue_full") == refused_before + 2
    # Once there is room, the same requests are prepared and refused for what they are.
    assert_error(raw_post(server, not_an_image), 400, "not an image")
    assert_still_serves(server)


def test_the_early_queue_check_counts_the_rows_about_to_start_as_room(server):
    """A full queue beside free batch rows is a moment's state (the scheduler starts those requests
    at its next iteration): a request arriving then would fit by the time it is prepared, and the
    early check must let it through. Held here by a prefill pass that waits in the scheduler thread."""
    from service.errors import QueueFull

    engine = server.engine
    prefiller = engine.scheduler.batch.prefiller
    entered, release = threading.Event(), threading.Event()
    run_pass = prefiller.run_pass

    def held(*args, **kwargs):
        vars(prefiller).pop("run_pass", None)  # once
        entered.set()
        release.wait(60)
        return run_pass(*args, **kwargs)

    prefiller.run_pass = held
    prompt = [{"role": "user", "content": "hi"}]
    try:
        handles = [engine.submit(engine.prepare(prompt, [], max_tokens=2))]
        assert entered.wait(30)
        handles += [engine.submit(engine.prepare(prompt, [], max_tokens=2)) for _ in range(server.settings.max_queue)]
        assert engine.queue_depth == server.settings.max_queue
        engine.check_queue_room()  # 7 rows free: 7 of the queued start at the next iteration
        with engine.paused(), pytest.raises(QueueFull):  # nothing starts while paused: full is full
            engine.check_queue_room()
    finally:
        release.set()
    for handle in handles:
        assert [e.finish_reason for e in handle][-1] == "length"
    assert_still_serves(server)


def test_the_early_queue_check_is_safe_beside_the_scheduler_thread(server):
    """The early check runs on the event loop while the scheduler thread starts and finishes prompts:
    it counted the starting rows by iterating the batch's jobs and reading each one's forks, which a
    finishing prefill pops meanwhile (a KeyError: that request's 500). Requests of n > 1 prefilling
    over and over beside a thread that checks all along; the check only ever says the queue is full."""
    from service.errors import QueueFull

    engine, done, failures = server.engine, threading.Event(), []

    def check_all_along():
        while not done.is_set():
            try:
                engine.check_queue_room()
            except QueueFull:
                pass
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                failures.append(exc)
                return

    checker = threading.Thread(target=check_all_along)
    checker.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: server.client().completions.create(
                model=SERVED_NAME, prompt=f"request {i} " * 8, max_tokens=2, n=3, temperature=1.0), range(60)))
    finally:
        done.set()
        checker.join()
    assert failures == []
    assert all(len(r.choices) == 3 for r in replies)


def test_out_of_memory_is_503_then_next_request_works(server):
    errors_before = metric(server, "vlkit_request_errors_total", kind="out_of_memory")
    fail_next_forward(server.engine, torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    with pytest.raises(openai.InternalServerError) as info:
        ask(server.client(), "this one meets the OOM")
    assert info.value.status_code == 503
    assert "out of memory" in info.value.body["message"]
    assert metric(server, "vlkit_request_errors_total", kind="out_of_memory") == errors_before + 1
    assert_still_serves(server)


def test_out_of_memory_stacking_the_first_tokens_logits_fails_only_those_prompts(server, monkeypatch):
    """The logits after the prompts a prefill pass finished were stacked inside Batch.prefill, once
    those prompts had left its started jobs, outside every request's own error path: a CUDA OOM
    there reached the scheduler's catch-all, which failed every running request and left the
    finished prompts unanswered. Now it fails those prompts alone (503) and a decoding one goes on."""
    engine = server.engine
    vocab = engine.scheduler.batch.prefiller.decoder.lm_head.weight.shape[0]
    stack = torch.stack

    def stack_failing_once(tensors, *args, **kwargs):
        first_tokens = (threading.current_thread().name == "vlkit-engine" and isinstance(tensors, list)
                        and all(t.dim() == 1 and t.shape[0] == vocab for t in tensors))
        if first_tokens and torch.stack is stack_failing_once:
            torch.stack = stack
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return stack(tensors, *args, **kwargs)

    running = engine.submit(engine.prepare_text("A long answer, please.", max_tokens=300, temperature=0,
                                                ignore_eos=True))
    events = iter(running)
    first = next(events)  # decoding now
    monkeypatch.setattr(torch, "stack", stack_failing_once)
    with pytest.raises(openai.InternalServerError) as info:
        ask(server.client(), "this one's first token meets the OOM")
    assert info.value.status_code == 503 and "out of memory" in info.value.body["message"]
    rest = [first, *events]
    assert all(event.error is None for event in rest) and rest[-1].finish_reason == "length"
    assert len(running.token_ids) == 300
    assert_still_serves(server)


def test_out_of_memory_mid_stream_sends_error_then_done(server):
    client = server.client()
    stream = ask(client, "stream into an OOM", max_tokens=40, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    fail_next_forward(server.engine, torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "out of memory" in str(info.value.message).lower()
    assert_still_serves(server)


def test_client_disconnect_mid_stream_frees_the_slot(server):
    body = user("a long answer please", max_tokens=400, stream=True)
    cancelled_before = metric(server, "vllm:request_success_total", finished_reason="abort")
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        next(data), next(data), next(data)  # role chunk, then text: the request is running
        assert server.engine.running == 1
    # The connection is closed here, long before 400 tokens.
    deadline = time.monotonic() + 10
    while (server.engine.running or server.engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.running == 0 and server.engine.queue_depth == 0
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:request_success_total", finished_reason="abort") == cancelled_before + 1
    assert_still_serves(server)


def test_a_client_gone_before_its_stream_starts_is_cancelled(server):
    """The disconnect arrives before the first chunk (the app is driven over ASGI directly, as uvicorn
    does, with a client that is gone once its body is read): the queued request leaves the queue
    instead of generating 400 tokens for nobody."""
    import asyncio
    import json

    body = json.dumps(user("a long answer please", max_tokens=400, stream=True)).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"authorization", f"Bearer {API_KEY}".encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0)  # a real server may suspend here (the socket): the stream is cancelled before it begins

    cancelled_before = metric(server, "vllm:request_success_total", finished_reason="abort")
    with server.engine.paused():  # queued, not started: only a cancellation takes it out
        asyncio.run(server.app(scope, receive, send))
        assert server.engine.queue_depth == 0 and server.engine.running == 0
    assert metric(server, "vllm:request_success_total", finished_reason="abort") == cancelled_before + 1
    assert_still_serves(server)


def test_client_disconnect_without_stream_frees_the_slot(server):
    body = user("a long answer please", max_tokens=480)
    with server.engine.paused():  # keeps it queued until the client is gone
        done = threading.Event()

        def post():
            try:
                httpx.post(server.base_url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.5)
            except httpx.TimeoutException:
                pass
            done.set()

        threading.Thread(target=post).start()
        assert done.wait(10)
        deadline = time.monotonic() + 10
        while server.engine.queue_depth and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.queue_depth == 0
    assert_still_serves(server)
