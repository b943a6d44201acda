"""prompt_logprobs, and echo with logprobs, as vLLM 0.27 answers them, on the real server: each prompt
position's logprob, rank and top k compared with transformers' own forward of the same tiny model on
the same input ids (chat and completions, text and an image, a prompt over several prefill passes, a
prefix the cache already holds, n > 1), the echoed tokens' logprobs lm-evaluation-harness scores
with, streams where vLLM sends them, and vLLM's refusals."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from service.api.completions import CompletionRequest
from service.api.media import ImageLoader
from service.api.protocol import ChatCompletionRequest
from tests.conftest import API_KEY, SERVED_NAME, free_port, png_data_url, start_server
from tests.test_service_api import assert_error, image_part, metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHUNK = 64  # prefill pass tokens: the long prompts below span several passes
LONG = "The street in the morning was quiet, and the bakery on the corner smelled of bread. " * 4


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_dir):
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        model=str(tiny_model_dir), served_model_name=SERVED_NAME, host="127.0.0.1", port=free_port(),
        max_model_len=512, min_pixels=3136, max_pixels=64 * 64 * 4, max_images_per_request=2, max_batch_size=8,
        max_queue=8, api_key=API_KEY, allowed_media_dir=media_dir, max_num_batched_tokens=CHUNK, log_level="warning")
    running, stop = start_server(settings)
    yield running
    stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json={"model": SERVED_NAME, **body}, headers=AUTH, timeout=120)


def ok(server, path: str, body: dict) -> dict:
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    return response.json()


def prepared(server, path: str, body: dict):
    """The engine's request for this body, prepared as the route prepares it (its prompt's ids and images)."""
    engine = server.engine
    if path == "/v1/completions":
        request = CompletionRequest.model_validate({"model": SERVED_NAME, **body})
        return engine.prepare_text(request.prompt, **request.to_engine_options())
    request = ChatCompletionRequest.model_validate({"model": SERVED_NAME, **body})
    messages, urls = request.chat_messages()
    images = asyncio.run(ImageLoader(server.settings).load(urls))
    return engine.prepare(messages, images, **request.to_engine_options())


def reference(server, path: str, body: dict) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and transformers' log-softmax of its forward's logits ``[T, vocab]``."""
    prompt = prepared(server, path, body).prompt
    ids = prompt.input_ids[None]
    images = {} if prompt.pixel_values is None else {
        "pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw,
        "mm_token_type_ids": (ids == server.engine.model.config.image_token_id).int()}
    with torch.no_grad():
        logits = server.engine.model(input_ids=ids, **images).logits[0]
    return prompt.input_ids.tolist(), torch.log_softmax(logits.float(), dim=-1)


def assert_prompt_logprobs(prompt_logprobs: list, ids: list[int], logprobs: torch.Tensor, k: int, tokenizer) -> None:
    """vLLM's prompt_logprobs: None first; then position p's dict: the prompt's token (its rank: how
    many logprobs are >= its own), then the top k by rank (one that is the prompt's token keeps its
    place with its top rank), as transformers' forward gives them at position p - 1."""
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        row, token = logprobs[p - 1], ids[p]
        top = torch.topk(row, k)
        expected = {token: (row[token].item(), int((row >= row[token]).sum()))}
        for rank, (t, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            expected[t] = (value, rank)
        position = prompt_logprobs[p]
        assert list(position) == [str(t) for t in expected], p
        for t, (value, rank) in expected.items():
            entry = position[str(t)]
            assert entry["logprob"] == pytest.approx(value, abs=1e-4) and entry["rank"] == rank, (p, t, entry)
            assert entry["decoded_token"] == tokenizer.decode([t]) or tokenizer.decode([t]).endswith("\ufffd")


def test_completions_prompt_logprobs_over_several_passes_match_transformers(server):
    body = {"prompt": LONG, "max_tokens": 3, "temperature": 1.0, "seed": 1, "n": 2, "prompt_logprobs": 3,
            "return_token_ids": True}
    reply = ok(server, "/v1/completions", body)
    ids, logprobs = reference(server, "/v1/completions", body)
    assert len(ids) > 2 * CHUNK and reply["choices"][0]["prompt_token_ids"] == ids
    for choice in reply["choices"]:  # vLLM's: each choice carries its prompt's
        assert_prompt_logprobs(choice["prompt_logprobs"], ids, logprobs, 3, server.engine.tokenizer)
        assert choice["logprobs"] is None  # prompt_logprobs alone add no token logprobs
    zero = ok(server, "/v1/completions", {**body, "prompt_logprobs": 0})["choices"][0]["prompt_logprobs"]
    assert_prompt_logprobs(zero, ids, logprobs, 0, server.engine.tokenizer)  # each token's own alone
    plain = ok(server, "/v1/completions", {**body, "prompt_logprobs": None})["choices"]
    assert [c["prompt_logprobs"] for c in plain] == [None, None]
    assert [c["text"] for c in plain] == [c["text"] for c in reply["choices"]]  # the same answers


def test_chat_prompt_logprobs_with_an_image_match_transformers(server):
    body = {"messages": [{"role": "user", "content": [image_part(png_data_url(96, 64)),
                                                      {"type": "text", "text": "What is in the picture?"}]}],
            "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2, "return_token_ids": True}
    reply = ok(server, "/v1/chat/completions", body)
    ids, logprobs = reference(server, "/v1/chat/completions", body)
    assert reply["prompt_token_ids"] == ids and ids.count(server.engine.model.config.image_token_id) > 1
    assert_prompt_logprobs(reply["prompt_logprobs"], ids, logprobs, 2, server.engine.tokenizer)
    assert reply["choices"][0]["logprobs"] is None
    assert ok(server, "/v1/chat/completions", {**body, "prompt_logprobs": None})["prompt_logprobs"] is None


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(server):
    """vLLM's skip_reading_prefix_cache: a request for prompt logprobs reads nothing from the prefix
    cache (every position is computed), so a prompt an earlier request cached gets them all; its
    blocks stay shared with the requests that do read the cache."""
    body = {"prompt": "A bakery, a tram stop and a long street. " * 6, "max_tokens": 1, "temperature": 0}
    hits = lambda: metric(server, "vllm:prefix_cache_hits_total")  # noqa: E731
    ok(server, "/v1/completions", body)
    before = hits()
    ok(server, "/v1/completions", body)
    assert hits() > before  # the prefix is cached
    before = hits()
    reply = ok(server, "/v1/completions", {**body, "prompt_logprobs": 1})
    assert hits() == before
    ids, logprobs = reference(server, "/v1/completions", body)
    assert_prompt_logprobs(reply["choices"][0]["prompt_logprobs"], ids, logprobs, 1, server.engine.tokenizer)
    ok(server, "/v1/completions", body)
    assert hits() > before


def test_echo_with_logprobs_scores_the_prompt_like_vllm(server):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 0) through the
    openai SDK: the prompt's tokens, the first without a logprob, each later one's logprob and its
    top ones, the text offsets adding up the tokens' texts; with max_tokens, the answer's follow."""
    client = server.client()
    prompt = "The street in the morning"
    tokenizer = server.engine.tokenizer
    ids, logprobs = reference(server, "/v1/completions", {"prompt": prompt})
    scored = client.completions.create(model=SERVED_NAME, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))],
                                                  abs=1e-4)
    prompt_logprobs = choice.model_extra["prompt_logprobs"]  # vLLM's, beside the echo's
    assert_prompt_logprobs(prompt_logprobs, ids, logprobs, 1, tokenizer)
    for p in range(1, len(ids)):  # the token's own first, then the likeliest (vLLM: logprobs + 1 at most)
        entries = list(prompt_logprobs[p].values())
        assert lp.top_logprobs[p] == {e["decoded_token"]: e["logprob"] for e in entries[:2]}
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    whole = ok(server, "/v1/completions", body)["choices"][0]
    answer = ok(server, "/v1/completions", {**body, "echo": False})["choices"][0]
    assert whole["text"] == prompt + answer["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert whole["logprobs"][key][len(ids):] == answer["logprobs"][key]
    assert whole["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert len(whole["logprobs"]["top_logprobs"][1]) <= 3
    tokens = whole["logprobs"]["tokens"]
    assert whole["logprobs"]["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]

    # Streamed: the first chunk carries the echo and the prompt's logprobs before the first tokens'.
    sdk = {key: value for key, value in body.items() if key != "ignore_eos"}
    chunks = list(client.completions.create(model=SERVED_NAME, stream=True, extra_body={"ignore_eos": True}, **sdk))
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt) and first.logprobs.tokens[:len(ids)] == lp.tokens
    assert first.logprobs.token_logprobs[0] is None
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == tokens and "".join(c.choices[0].text for c in chunks if c.choices) == whole["text"]
    alone = list(client.completions.create(model=SERVED_NAME, prompt=prompt, echo=True, logprobs=1, max_tokens=0,
                                           stream=True))
    assert [(c.choices[0].text, c.choices[0].logprobs.tokens, c.choices[0].finish_reason) for c in alone] == \
        [(prompt, lp.tokens, "length")]


def test_chat_echo_answers_with_the_prompts_logprobs_like_vllm(server):
    """vLLM's chat echo asks for prompt_logprobs of top_logprobs (0 unless set): a whole answer has
    them, a stream (which vLLM sends without them) does not."""
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}],
            "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 3, "temperature": 0,
            "echo": True}
    ids, logprobs = reference(server, "/v1/chat/completions", body)
    tokenizer = server.engine.tokenizer
    plain = ok(server, "/v1/chat/completions", body)
    assert plain["choices"][0]["message"]["content"].startswith("Well,")
    assert_prompt_logprobs(plain["prompt_logprobs"], ids, logprobs, 0, tokenizer)
    with_top = ok(server, "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 2})
    assert_prompt_logprobs(with_top["prompt_logprobs"], ids, logprobs, 2, tokenizer)
    assert len(with_top["choices"][0]["logprobs"]["content"]) == with_top["usage"]["completion_tokens"]
    lines = [line for line in post(server, "/v1/chat/completions", {**body, "logprobs": True, "stream": True}
                                   ).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and not any("prompt_logprobs" in line for line in lines)


def test_prompt_logprobs_refusals_are_vllms(server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"prompt": "hi", "max_tokens": 2}
    vocab = server.engine.prompts.vocab_size
    for body in (chat, completion):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        for value, words in ((21, "Requested prompt logprobs of 21, which is greater than max allowed: 20"),
                             (-1, f"Requested prompt logprobs of {vocab}, which is greater than max allowed: 20"),
                             (-2, "`prompt_logprobs` must be a positive value or -1."),
                             ("3", "`prompt_logprobs` must be an integer.")):
            error = assert_error(post(server, path, {**body, "prompt_logprobs": value}), 400, words)
            assert error["param"] == "prompt_logprobs", (path, value, error)
        error = assert_error(post(server, path, {**body, "prompt_logprobs": 1, "stream": True}), 400,
                             "`prompt_logprobs` are not available when `stream=True`.")
        assert error["param"] == "prompt_logprobs"
        lines = [line for line in post(server, path, {**body, "prompt_logprobs": 0, "stream": True}).text.splitlines()
                 if line]
        assert lines[-1] == "data: [DONE]"  # 0 is allowed in a stream (vLLM sends none)
    error = assert_error(post(server, "/v1/completions", {**completion, "echo": True, "logprobs": 21}), 400,
                         "Requested sample logprobs of 21")
    assert error["param"] == "logprobs"  # vLLM checks the sample logprobs first


def test_prompt_logprobs_packed_with_another_prompt_change_nothing_of_it(server, monkeypatch):
    """A prompt asking for prompt logprobs and one that does not, started together (the plain one
    first: their pieces share a prefill pass): the plain one answers as it does alone and gets no
    prompt logprobs; the other's match transformers'."""
    engine = server.engine
    other = "Another question about the tram."
    alone = engine.generate(engine.prepare_text(other, max_tokens=6, temperature=0, ignore_eos=True))
    prefiller, passes = engine.scheduler.batch.prefiller, []
    run_pass = prefiller.run_pass

    def recorded(pieces):
        passes.append([job.prompt_logprobs for job, _, _ in pieces])
        return run_pass(pieces)

    monkeypatch.setattr(prefiller, "run_pass", recorded)
    with engine.paused():
        plain = engine.submit(engine.prepare_text(other, max_tokens=6, temperature=0, ignore_eos=True))
        scored = engine.submit(engine.prepare_text(LONG, max_tokens=2, temperature=0, prompt_logprobs=2))
    for handle in (plain, scored):
        assert all(event.error is None for event in handle)
    assert passes[0] == [None, 2]  # one pass computed both
    assert plain.token_ids == alone.token_ids and plain.prompt_logprobs is None
    ids, logprobs = reference(server, "/v1/completions", {"prompt": LONG})
    entries = scored.prompt_logprobs.entries()
    assert scored.prompt_logprobs.prompt_ids == ids and len(entries) == len(ids) - 1
    assert [e.logprob for e in entries] == pytest.approx([logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))],
                                                         abs=1e-4)


def test_a_request_for_prompt_logprobs_is_no_prefix_cache_query(server):
    """vLLM's get_computed_blocks returns before recording a query for a request that skips reading
    the prefix cache: vllm:prefix_cache_queries counts only prompts that looked the cache up, so the
    hit rate (hits / queries) of a server serving lm-evaluation-harness stays that of the others."""
    queries = lambda: metric(server, "vllm:prefix_cache_queries_total")  # noqa: E731
    body = {"prompt": "A quiet street, a tram and a bakery. " * 3, "max_tokens": 1}
    before = queries()
    ok(server, "/v1/completions", {**body, "prompt_logprobs": 0})
    ok(server, "/v1/completions", {**body, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert queries() == before
    ok(server, "/v1/completions", body)
    assert queries() > before


def test_out_of_memory_gathering_prompt_logprobs_fails_that_request_alone(server, monkeypatch):
    """A CUDA OOM while a finished prompt's logprobs are put together (concatenated on the device)
    came after the prefill pass had moved the prompt out of the batch's started jobs, out of any
    request's own error path: the scheduler failed every running request, and the prompt's own,
    in neither list, never ended (its client waited forever). Now it is the finishing prompt's error
    (503 out of memory) and a request already decoding goes on."""
    from service.decode.qwen3_prefill import PrefillJob

    engine = server.engine

    def out_of_memory(job):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    running = engine.submit(engine.prepare_text("A long answer, please.", max_tokens=300, temperature=0,
                                                ignore_eos=True))
    events = iter(running)
    first = next(events)  # decoding now
    monkeypatch.setattr(PrefillJob, "prompt_logprob_tensors", property(out_of_memory))
    scored = httpx.post(server.base_url + "/v1/completions", headers=AUTH, timeout=30,
                        json={"model": SERVED_NAME, "prompt": LONG, "max_tokens": 2, "prompt_logprobs": 1})
    assert_error(scored, 503, "ran out of memory")
    rest = [first, *events]
    assert all(event.error is None for event in rest) and rest[-1].finish_reason == "length"
    assert len(running.token_ids) == 300
