"""The streamed chunks: stream_chunks renders content chunks from a frame rendered once, and the bytes
must be those of the pydantic ChatCompletionChunk it stands for (no server needed here)."""
from __future__ import annotations

import asyncio
import json

import pytest

from service.api.responses import chat_chunk, token_choice, token_delta
from service.api.serving import stream_chunks
from service.api.sse import ChunkFrame, sse
from service.engine import Event
from service.errors import OutOfMemory
from service.metrics import ServiceMetrics

TEXTS = ["", " word", "caf\u00e9 \u00fcber \u4e2d\u6587", "\U0001F600\U0001F468\u200d\U0001F469", 'say "hi"',
         "back\\slash", "line\nbreak\r\n", "tab\there", "\x00\x01\x1f\x7f", "</script>", "\u2028\u2029\ufeff",
         "\ufffd", "{\"json\": [1, 2]}", "/ slash"]


@pytest.mark.parametrize("model", ["tiny-qwen3-vl", 'odd "name" \u00e9\\', "Qwen/Qwen3-VL-2B-Instruct"])
@pytest.mark.parametrize("index", [0, 3])
def test_frame_bytes_equal_pydantic(model, index):
    frame = ChunkFrame("chatcmpl-0123abcd", 1700000000, model, index)
    for text in TEXTS[1:] + [chr(c) for c in range(0x00, 0x800)]:
        chunk = chat_chunk("chatcmpl-0123abcd", 1700000000, model, [token_choice(index, token_delta(text), None, None)])
        assert frame.render(text) == sse(chunk), repr(text)


class FakeHandle:
    """A RequestHandle's reading side (the stream never cancels: cancellation.py does)."""

    def __init__(self, events):
        self.events = events
        self.prompt_logprobs = None  # none of these requests asks for them

    async def __aiter__(self):
        for event in self.events:
            yield event


def run_stream(events, include_usage=True) -> list[bytes]:
    async def collect():
        return [c async for c in stream_chunks(FakeHandle(events), "chatcmpl-42", "m", include_usage, ServiceMetrics())]

    return asyncio.run(collect())


def parse(chunks: list[bytes]) -> list:
    out = []
    for chunk in chunks:
        text = chunk.decode()
        assert text.startswith("data: ") and text.endswith("\n\n")
        body = text[len("data: "):-2]
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_stream_chunks_are_vllms():
    """vLLM's chunks, key for key (model_dump_json(exclude_unset=True) of what its stream generator
    builds): the role chunk with prompt_token_ids and prompt_text, token chunks with token_ids,
    stop_reason on the last only, the usage chunk without nulls."""
    events = [Event(text=t, prompt_tokens=7, completion_tokens=i + 1) for i, t in enumerate(TEXTS[1:6])]
    events.append(Event(text="end", finish_reason="stop", prompt_tokens=7, completion_tokens=6))
    parsed = parse(run_stream(events))
    top = {"id": "chatcmpl-42", "object": "chat.completion.chunk", "created": parsed[0]["created"], "model": "m"}
    assert parsed[0] == {**top, "prompt_token_ids": None, "prompt_text": None, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
    assert len(parsed) == len(events) + 3
    for got, event in zip(parsed[1:-3], events):
        assert got == {**top, "choices": [{"index": 0, "delta": {"content": event.text}, "logprobs": None,
                                           "finish_reason": None, "token_ids": None}]}
    assert parsed[-3] == {**top, "choices": [{"index": 0, "delta": {"content": "end"}, "logprobs": None,
                                              "finish_reason": "stop", "stop_reason": None, "token_ids": None}]}
    assert parsed[-2] == {**top, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 6,
                                                          "total_tokens": 13}}
    assert parsed[-1] == "[DONE]"


def test_stream_without_usage_and_empty_events_skipped():
    events = [Event(text="", prompt_tokens=1, completion_tokens=1),
              Event(text="a", prompt_tokens=1, completion_tokens=2),
              Event(text="", finish_reason="length", prompt_tokens=1, completion_tokens=3)]
    parsed = parse(run_stream(events, include_usage=False))
    assert [p["choices"][0]["delta"] for p in parsed[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": "a"}, {}]  # vLLM's (hermes) finishing delta of no text
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"
    assert parsed[-1] == "[DONE]"


def test_stream_error_event_ends_with_the_error_body():
    error = OutOfMemory("no room")
    parsed = parse(run_stream([Event(text="a", prompt_tokens=1, completion_tokens=1), Event(error=error)]))
    assert parsed[-2] == error.to_dict()
    assert parsed[-1] == "[DONE]"


class FailingHandle(FakeHandle):
    """A handle whose events stop with an exception that is no error event (a bug in the layer)."""

    async def __aiter__(self):
        for event in self.events:
            yield event
        raise RuntimeError("boom")


def test_a_failure_while_streaming_ends_with_an_error_body_and_done():
    """vLLM's stream generators too: any exception after the stream started is told in it."""
    async def collect():
        return [c async for c in stream_chunks(FailingHandle([Event(text="a", prompt_tokens=1, completion_tokens=1)]),
                                               "chatcmpl-42", "m", True, ServiceMetrics())]

    parsed = parse(asyncio.run(collect()))
    assert parsed[1]["choices"][0]["delta"]["content"] == "a"
    assert parsed[-2]["error"]["code"] == 500 and "RuntimeError: boom" in parsed[-2]["error"]["message"]
    assert parsed[-1] == "[DONE]"


def test_long_logprobs_are_rendered_off_the_event_loop(tiny_model_dir, monkeypatch):
    """Logprobs cost ~0.3 ms a token to render with 20 top ones (each token's text, then pydantic):
    an answer of n=8 x 2000 tokens held the event loop, so every other request and /health, for
    seconds (a stream's too, once a client that stopped reading reads its backlog, merged into one
    event). Past a few dozen tokens' they are rendered in a worker thread."""
    import threading

    from transformers import AutoTokenizer

    import service.api.serving as serving
    from service.api.serving import AnswerShape, complete
    from service.engine.logits import TokenLogprob

    shape = AnswerShape(tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    where = []
    real = serving.chat_logprobs

    def recording(entries, texts):
        where.append((len(entries), threading.current_thread()))
        return real(entries, texts)

    monkeypatch.setattr(serving, "chat_logprobs", recording)

    def answer(tokens: int) -> list[Event]:
        entries = [TokenLogprob(5, -1.0, [(6, -2.0)] * 20) for _ in range(tokens)]
        return [Event(text="x" * tokens, finish_reason="length", prompt_tokens=1, completion_tokens=tokens,
                      token_ids=[5] * tokens, logprobs=entries)]

    async def both(tokens: int):
        loop_thread = threading.current_thread()
        response = await complete(FakeHandle(answer(tokens)), "chatcmpl-1", "m", shape)
        chunks = [c async for c in stream_chunks(FakeHandle(answer(tokens)), "chatcmpl-1", "m", False,
                                                 ServiceMetrics(), shape)]
        return loop_thread, response, chunks

    loop_thread, response, chunks = asyncio.run(both(500))
    assert len(json.loads(response.body)["choices"][0]["logprobs"]["content"]) == 500
    assert len(parse(chunks)[1]["choices"][0]["logprobs"]["content"]) == 500
    assert [n for n, _ in where] == [500, 500] and all(thread is not loop_thread for _, thread in where)
    where.clear()
    loop_thread, _, _ = asyncio.run(both(3))  # a few tokens' (a stream's usual event): no thread hop
    assert [n for n, _ in where] == [3, 3] and all(thread is loop_thread for _, thread in where)


def test_a_stream_with_a_backlog_lets_the_event_loop_run_every_few_chunks():
    """Neither an event already waiting nor a send into a socket with room suspends a stream: one that
    had a backlog to send (its client read nothing for a while) ran to its end before any other
    request, /health included, got a turn."""
    events = [Event(text=f"t{i}", prompt_tokens=1, completion_tokens=i + 1) for i in range(200)]
    events.append(Event(text="", finish_reason="length", prompt_tokens=1, completion_tokens=201))

    async def race():
        turns = 0

        async def other_request():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.ensure_future(other_request())
        await asyncio.sleep(0)
        chunks = [c async for c in stream_chunks(FakeHandle(events), "chatcmpl-42", "m", False, ServiceMetrics())]
        other.cancel()
        return turns, chunks

    from service.api.serving import YIELD_EVERY

    turns, chunks = asyncio.run(race())
    assert parse(chunks)[-1] == "[DONE]"
    assert turns >= 200 // YIELD_EVERY, turns  # a turn every few chunks (it was one, before the stream began)


def test_gathering_a_long_answers_logprobs_takes_linear_time():
    """Each event's logprobs were appended by copying the choice's list so far: quadratic, in the
    event loop (100000 tokens: seconds)."""
    import time

    from service.api.serving import ChoiceText
    from service.engine.logits import TokenLogprob

    entry, choice = TokenLogprob(1, -1.0, []), ChoiceText()
    started = time.perf_counter()
    for _ in range(100_000):
        choice.add(Event(text="a", token_ids=[1], logprobs=[entry]))
    assert len(choice.logprobs) == 100_000 and time.perf_counter() - started < 1.0


def test_a_large_stream_interval_joins_its_events_in_linear_time():
    """stream_interval held each choice's events merged pair by pair: quadratic in the interval (a
    request may ask for any): 100000 tokens of a stream_interval of 10**9 took ~30 s, in the loop."""
    import time

    from service.api.serving import AnswerShape

    count = 100_000
    events = [Event(text="ab", token_ids=[1], prompt_tokens=1, completion_tokens=i + 1) for i in range(count)]
    events.append(Event(text="!", token_ids=[2], finish_reason="length", prompt_tokens=1, completion_tokens=count + 1))

    async def collect():
        return [c async for c in stream_chunks(FakeHandle(events), "chatcmpl-42", "m", False, ServiceMetrics(),
                                               AnswerShape(stream_interval=10**9))]

    started = time.perf_counter()
    parsed = parse(asyncio.run(collect()))
    assert time.perf_counter() - started < 3.0
    texts = [p["choices"][0]["delta"]["content"] for p in parsed[1:-1]]
    assert texts == ["ab", "ab" * (count - 1) + "!"]  # the first at once, then the rest with the last


def test_a_whole_completions_answer_renders_long_logprobs_off_the_event_loop(tiny_model_dir, monkeypatch):
    """/v1/completions' whole answer too: its logprobs (each token's text and its top ones') were
    rendered in the event loop, seconds for n=8 x 2000 tokens."""
    import threading

    from transformers import AutoTokenizer

    import service.api.completions as completions
    from service.api.serving import AnswerShape
    from service.engine.logits import TokenLogprob

    shape = AnswerShape(tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    where = []
    real = completions.completion_logprobs

    def recording(entries, texts, *args):
        where.append((len(entries), threading.current_thread()))
        return real(entries, texts, *args)

    monkeypatch.setattr(completions, "completion_logprobs", recording)
    entries = [TokenLogprob(5, -1.0, [(6, -2.0)] * 5) for _ in range(500)]
    events = [Event(text="x" * 500, finish_reason="length", prompt_tokens=1, completion_tokens=500,
                    token_ids=[5] * 500, logprobs=entries)]

    async def answer():
        return threading.current_thread(), await completions.whole([FakeHandle(events)], "cmpl-1", "m", [shape])

    loop_thread, body = asyncio.run(answer())
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 500
    assert [n for n, _ in where] == [500] and where[0][1] is not loop_thread
