"""vLLM's request surface on the real server, through the openai SDK where it has the field: each
field shown by its effect; /v1/completions, /tokenize, /detokenize, /version, /health; the Grafana
dashboard's series on /metrics."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, SERVED_NAME, png_data_url
from tests.test_service_api import assert_error, image_part, metric

REPO = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def chat(server, content="Tell me about the street.", **fields) -> dict:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **fields}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=60)


# ---- chat fields ----------------------------------------------------------------------------------


def test_logprobs_and_top_logprobs_in_openais_shape(server):
    reply = server.client().chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token  # greedy: the top one
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.bytes == list(c.token.encode())
    as_ids = chat(server, "hi", logprobs=True, max_tokens=3, return_tokens_as_token_ids=True, return_token_ids=True)
    choice = as_ids["choices"][0]
    assert [c["token"] for c in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]


def test_top_logprobs_put_the_sampled_token_first_like_vllm(server):
    """vLLM's logprobs of a position are a dict of the sampled token, then the top ones by rank; the
    chat API's top_logprobs are its first top_logprobs items. So a sampled token is always
    top_logprobs[0], and one outside the top ones pushes the last of them out (completions list
    them all, the sampled one first)."""
    fields = {"max_tokens": 12, "temperature": 1.5, "seed": 3, "logprobs": True}
    two = chat(server, "hi", top_logprobs=2, **fields)["choices"][0]["logprobs"]["content"]
    wide = chat(server, "hi", top_logprobs=20, **fields)["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in two] == [c["token"] for c in wide]  # the same seed: the same tokens
    outside = 0
    for narrow, full in zip(two, wide):
        ranked = [t["token"] for t in full["top_logprobs"]]
        assert ranked[0] == full["token"]  # sampled first, then by rank
        assert [t["token"] for t in narrow["top_logprobs"]] == ranked[:2]
        assert narrow["top_logprobs"][0]["logprob"] == narrow["logprob"]
        outside += narrow["logprob"] < max(t["logprob"] for t in full["top_logprobs"])
    assert outside  # some sampled token was not the likeliest
    completion = post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 12,
                                                  "temperature": 1.5, "seed": 3, "logprobs": 2}).json()
    logprobs = completion["choices"][0]["logprobs"]
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        assert next(iter(top)) == token and len(top) <= 3


def test_logprob_tokens_of_split_characters_join_into_the_text_like_vllm(server):
    """Qwen's byte-level tokens split a CJK character (or an emoji) into pieces that decode alone to
    U+FFFD. vLLM 0.27 decodes such a token again with the sampled tokens before it: "" while the
    character is incomplete, the whole character on the token that completes it; so the tokens'
    texts join into the answer and a completion's text_offset counts the answer's characters."""
    answer = "\u4e2d\u6587 ok"  # forced by a one-choice grammar: its characters come as byte tokens
    fields = {"structured_outputs": {"choice": [answer]}, "max_tokens": 20, "temperature": 0,
              "logprobs": True, "top_logprobs": 1, "return_token_ids": True}
    reply = chat(server, "hi", **fields)
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    tail = server.engine.tokenizer.decode(choice["token_ids"][-1:]) if choice["finish_reason"] == "stop" else ""
    assert choice["message"]["content"] == answer
    assert "".join(c["token"] for c in content) == answer + tail
    assert "\u4e2d" in [c["token"] for c in content] and not any("\ufffd" in c["token"] for c in content)
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    streamed = [entry for c in _stream(server, "/v1/chat/completions", {"model": SERVED_NAME, "stream": True,
                                                                        "messages": [{"role": "user", "content": "hi"}],
                                                                        **fields})
                if c["choices"] and c["choices"][0]["logprobs"] for entry in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content  # the pieces before a character count across chunks
    completion = post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", **fields, "logprobs": 1}).json()
    logprobs = completion["choices"][0]["logprobs"]
    assert completion["choices"][0]["text"] == answer and "".join(logprobs["tokens"]).startswith(answer)
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]


def test_an_answer_cut_inside_a_character_ends_before_it_like_vllm(server):
    """vLLM's detokenizer (tokenizers' DecodeStream) never emits an incomplete UTF-8 character: an
    answer that max_tokens cuts between the byte tokens of one ends before it, not with U+FFFD,
    whole or streamed, and its logprob tokens (the pieces' texts are "") still join into it."""
    answer = "\u4e2d\u6587 ok"
    fields = {"structured_outputs": {"choice": [answer]}, "temperature": 0, "return_token_ids": True}
    ids = chat(server, "hi", max_tokens=20, **fields)["choices"][0]["token_ids"]
    decode = server.engine.tokenizer.decode
    cut = next(k for k in range(1, len(ids)) if decode(ids[:k]).endswith("\ufffd") and decode(ids[:k]).rstrip("\ufffd"))
    reply = chat(server, "hi", max_tokens=cut, logprobs=True, **fields)["choices"][0]
    text = reply["message"]["content"]
    assert reply["finish_reason"] == "length" and text == decode(ids[:cut]).rstrip("\ufffd") and text
    assert "".join(c["token"] for c in reply["logprobs"]["content"]) == text
    streamed = _stream(server, "/v1/chat/completions", {"model": SERVED_NAME, "stream": True, "max_tokens": cut,
                                                        "messages": [{"role": "user", "content": "hi"}], **fields})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]) == text
    completion = post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "max_tokens": cut,
                                                  **fields}).json()
    assert not completion["choices"][0]["text"].endswith("\ufffd")


def test_n_choices_non_streamed_and_streamed(server):
    client = server.client()
    reply = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=1.0, seed=5, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 18
    stream = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=1.0, seed=5, n=3, stream=True,
                                            stream_options={"include_usage": True})
    texts, finished = {}, set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
        if chunk.usage:
            assert chunk.usage.completion_tokens == 18
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in reply.choices]


def test_prompt_fields_change_the_prompt(server):
    plain = chat(server, [image_part(png_data_url()), {"type": "text", "text": "what?"}], return_prompt_text=True)
    assert plain["prompt_text"].endswith("<|im_start|>assistant\n")
    vision_id = chat(server, [image_part(png_data_url()), {"type": "text", "text": "what?"}], return_prompt_text=True,
                     chat_template_kwargs={"add_vision_id": True})
    assert "Picture 1: " in vision_id["prompt_text"] and "Picture 1" not in plain["prompt_text"]
    assert vision_id["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    messages = [{"role": "user", "content": "Say a word."}, {"role": "assistant", "content": "The word is"}]
    body = {"model": SERVED_NAME, "messages": messages, "max_tokens": 4, "temperature": 0, "return_prompt_text": True}
    continued = post(server, "/v1/chat/completions", {**body, "add_generation_prompt": False,
                                                      "continue_final_message": True, "echo": True}).json()
    assert continued["prompt_text"].endswith("The word is")  # open: no <|im_end|> after it
    assert continued["choices"][0]["message"]["content"].startswith("The word is")  # echo: the last message first
    no_prompt = post(server, "/v1/chat/completions", {**body, "add_generation_prompt": False}).json()
    assert no_prompt["prompt_text"].endswith("<|im_end|>\n")
    special = chat(server, "hi", add_special_tokens=True, return_token_ids=True)
    assert special["prompt_token_ids"] == chat(server, "hi", return_token_ids=True)["prompt_token_ids"]  # Qwen: no BOS


def test_the_other_content_part_shapes_vllm_reads_give_the_same_prompt(server):
    """vLLM's chat parser also takes bare strings, input_text / output_text / refusal / thinking
    parts, the Responses API's input_image (image_url a string; vLLM wants its detail too, here it
    is optional) and a part without type that has an image_url: each is the same prompt, token for
    token, as the canonical text and image_url parts; a refusal without its text is skipped."""
    url = png_data_url()
    canonical = chat(server, [image_part(url), {"type": "text", "text": "what?"}, {"type": "text", "text": "no"}],
                     return_token_ids=True)
    for content in ([{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "what?"},
                     {"type": "refusal", "refusal": "no"}],
                    [{"image_url": url}, "what?", "no"],
                    [{"image_url": {"url": url}}, {"type": "output_text", "text": "what?"},
                     {"type": "refusal"}, {"type": "thinking", "thinking": "no"}]):
        other = chat(server, content, return_token_ids=True)
        assert other["prompt_token_ids"] == canonical["prompt_token_ids"], content
        assert other["choices"][0]["message"]["content"] == canonical["choices"][0]["message"]["content"]


def test_mm_processor_kwargs_resize_within_the_servers_limits(server):
    content = [image_part(png_data_url(128, 128)), {"type": "text", "text": "what?"}]
    full = chat(server, content)["usage"]["prompt_tokens"]
    smaller = chat(server, content, mm_processor_kwargs={"max_pixels": 64 * 64})["usage"]["prompt_tokens"]
    assert full - smaller == 16 - 4  # 128x128 -> 4x4 merged image tokens; at 64x64 -> 2x2
    too_big = {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}],
               "mm_processor_kwargs": {"max_pixels": server.settings.max_pixels + 1}}
    assert_error(post(server, "/v1/chat/completions", too_big), 400, "max_pixels")
    odd = {**too_big, "mm_processor_kwargs": {"do_resize": False}}
    assert_error(post(server, "/v1/chat/completions", odd), 400, "do_resize")


def test_request_id_token_ids_and_stop_reason(server):
    reply = chat(server, "hi", request_id="my-id-42", return_token_ids=True, max_tokens=5)
    assert reply["id"] == "chatcmpl-my-id-42"
    assert len(reply["choices"][0]["token_ids"]) == reply["usage"]["completion_tokens"] == 5
    assert len(reply["prompt_token_ids"]) == reply["usage"]["prompt_tokens"]
    stop_id = reply["choices"][0]["token_ids"][2]
    stopped = chat(server, "hi", stop_token_ids=[stop_id], max_tokens=5)["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == stop_id


def test_x_request_id_header_names_the_answer_like_vllm(server):
    """vLLM's _base_request_id: the X-Request-Id header (tracing proxies set it) wins over the body's request_id."""
    headers = {**AUTH, "X-Request-Id": "trace-7"}
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "request_id": "from-body"}
    reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200 and reply.json()["id"] == "chatcmpl-trace-7"
    streamed = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                          timeout=60)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks and {chunk["id"] for chunk in chunks} == {"chatcmpl-trace-7"}
    completion = httpx.post(server.base_url + "/v1/completions", headers=headers, timeout=60,
                            json={"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["id"] == "cmpl-trace-7"


def test_an_empty_model_name_means_the_served_model_like_vllm(server):
    """vLLM's _is_model_supported: an empty `model` (a UI's blank model field) is the served model."""
    assert chat(server, "hi", model="", max_tokens=2)["model"] == SERVED_NAME
    completion = post(server, "/v1/completions", {"model": "", "prompt": "hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["model"] == SERVED_NAME


def test_sampling_fields_reach_the_engine(server):
    base = chat(server, "hi", return_token_ids=True, max_tokens=12)["choices"][0]["token_ids"]
    forced = chat(server, "hi", return_token_ids=True, max_tokens=6, logit_bias={"77": 100})["choices"][0]
    assert set(forced["token_ids"]) == {77}
    allowed = chat(server, "hi", return_token_ids=True, max_tokens=6, allowed_token_ids=[5, 9])["choices"][0]
    assert set(allowed["token_ids"]) <= {5, 9}
    for fields in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                   {"bad_words": [server.engine.tokenizer.decode([base[0]])]}):
        changed = chat(server, "hi", return_token_ids=True, max_tokens=12, **fields)["choices"][0]["token_ids"]
        assert changed != base, fields
    sampled = [chat(server, "hi", temperature=2.0, min_p=1.0, seed=s, max_tokens=8)["choices"][0]["message"]["content"]
               for s in (1, 2)]
    assert sampled[0] == sampled[1] == chat(server, "hi")["choices"][0]["message"]["content"]
    eos = min(server.engine._eos_ids())
    held = chat(server, "hi", logit_bias={str(eos): 100}, min_tokens=4, max_tokens=8)
    assert held["usage"]["completion_tokens"] == 5 and held["choices"][0]["finish_reason"] == "stop"
    ignored = chat(server, "hi", logit_bias={str(eos): 100}, ignore_eos=True, max_tokens=4)
    assert ignored["usage"]["completion_tokens"] == 4


def test_skip_special_tokens_false_shows_them(server):
    vision_start = server.engine.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    fields = {"logit_bias": {str(vision_start): 100}, "max_tokens": 2}
    assert chat(server, "hi", **fields)["choices"][0]["message"]["content"] == ""
    shown = chat(server, "hi", skip_special_tokens=False, **fields)["choices"][0]["message"]["content"]
    assert shown == "<|vision_start|><|vision_start|>"


def test_stop_strings_and_include_stop_str_in_output(server):
    full = chat(server, "Tell me a story.", max_tokens=24)["choices"][0]["message"]["content"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    kept = chat(server, "Tell me a story.", max_tokens=24, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert kept["message"]["content"] == full[:full.index(stop) + len(stop)] and kept["stop_reason"] == stop


def test_continuous_usage_stats_put_the_usage_on_every_chunk(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, headers=AUTH) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content and all(c["usage"]["completion_tokens"] >= 1 for c in content)
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_continuous_usage_counts_each_choice_from_its_first_chunk_like_vllm(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
            "temperature": 1.0, "seed": 3, "ignore_eos": True, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = _stream(server, "/v1/chat/completions", body)
    prompt = chunks[0]["usage"]["prompt_tokens"]
    assert prompt > 0 and [c["usage"]["completion_tokens"] for c in chunks[:2]] == [0, 0]  # the role chunks
    counted = {0: 0, 1: 0}
    for chunk in chunks[2:-1]:
        choice = chunk["choices"][0]
        counted[choice["index"]] += len(choice["token_ids"])
        assert chunk["usage"] == {"prompt_tokens": prompt, "completion_tokens": counted[choice["index"]],
                                  "total_tokens": prompt + counted[choice["index"]]}  # that choice's, as vLLM's
    assert counted == {0: 4, 1: 4} and chunks[-1]["usage"]["completion_tokens"] == 8


def test_echo_joins_the_text_parts_with_newlines_like_vllm(server):
    messages = [{"role": "user", "content": "Say a word."},
                {"role": "assistant", "content": [{"type": "text", "text": "The"}, {"type": "text", "text": "word"}]}]
    reply = post(server, "/v1/chat/completions", {"model": SERVED_NAME, "messages": messages, "max_tokens": 2,
                                                  "add_generation_prompt": False, "continue_final_message": True,
                                                  "echo": True}).json()
    assert reply["choices"][0]["message"]["content"].startswith("The\nword")


def _stream(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base_url + path, json=body, headers=AUTH, timeout=60) as response:
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_each_streamed_choice_starts_with_the_prompt_token_ids_and_text_like_vllm(server):
    """vLLM's chat stream: every choice's first chunk (its role) carries prompt_token_ids (with
    return_token_ids) and prompt_text (with return_prompt_text), not only choice 0's."""
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2,
            "temperature": 1.0, "stream": True, "return_token_ids": True, "return_prompt_text": True}
    chunks = _stream(server, "/v1/chat/completions", body)
    firsts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role") == "assistant"]
    assert [c["choices"][0]["index"] for c in firsts] == [0, 1]
    whole = chat(server, "hi", max_tokens=1, return_token_ids=True, return_prompt_text=True)
    for first in firsts:
        assert first["prompt_token_ids"] == whole["prompt_token_ids"] and first["prompt_text"] == whole["prompt_text"]
    assert all(c.get("prompt_token_ids") is None for c in chunks if c not in firsts)


def test_stream_interval_sends_chunks_of_that_many_tokens(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 13, "temperature": 0,
            "stream": True, "stream_interval": 4, "return_token_ids": True, "ignore_eos": True}
    sizes = [len(c["choices"][0]["token_ids"]) for c in _stream(server, "/v1/chat/completions", body)
             if c["choices"] and c["choices"][0].get("token_ids")]
    assert sum(sizes) == 13
    assert all(size >= 4 for size in sizes[1:-1]) and len(sizes) <= 5
    every = _stream(server, "/v1/chat/completions", {**body, "stream_interval": 1})
    assert len([c for c in every if c["choices"] and c["choices"][0].get("token_ids")]) > len(sizes)
    completion = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 9, "temperature": 0, "stream": True,
                  "stream_interval": 3, "ignore_eos": True}
    assert len([c for c in _stream(server, "/v1/completions", completion) if c["choices"]]) <= 4


def test_streamed_logprobs_join_into_the_whole_answers_on_both_routes(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    streamed = [entry for c in _stream(server, "/v1/chat/completions", {**body, "stream": True})
                if c["choices"] and c["choices"][0]["logprobs"] for entry in c["choices"][0]["logprobs"]["content"]]
    assert len(whole) == 6 and streamed == whole
    body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    joined = {key: [] for key in whole}
    for chunk in _stream(server, "/v1/completions", {**body, "stream": True}):
        for key in joined:
            joined[key] += chunk["choices"][0]["logprobs"][key]
    assert joined == whole  # text_offset counts on across chunks


def test_system_fingerprint_on_whole_answers_and_each_streams_last_chunk_like_vllm(server):
    """vLLM 0.27 (--fingerprint-mode full, its default) names its build and configuration in
    system_fingerprint: on whole answers; streamed, on each choice's finishing chunk, or only on the
    usage chunk when one is asked for. Ours is "vlkit-<version>-<hash8>", the same on every answer."""
    chat_body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    completion_body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 3}
    fingerprint = post(server, "/v1/chat/completions", chat_body).json()["system_fingerprint"]
    assert re.fullmatch(r"vlkit-[^-]+-[0-9a-f]{8}", fingerprint)
    assert post(server, "/v1/completions", completion_body).json()["system_fingerprint"] == fingerprint
    for path, body in (("/v1/chat/completions", chat_body), ("/v1/completions", completion_body)):
        chunks = _stream(server, path, {**body, "stream": True, "n": 2, "temperature": 1.0, "ignore_eos": True})
        stamped = [c for c in chunks if c.get("system_fingerprint")]
        assert [c["choices"][0]["finish_reason"] for c in stamped] == ["length", "length"], path
        assert {c["system_fingerprint"] for c in stamped} == {fingerprint}
        with_usage = _stream(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert [c["usage"] is not None for c in with_usage if c.get("system_fingerprint")] == [True], path
        assert with_usage[-1]["system_fingerprint"] == fingerprint


def _missing_keys(ours, vllms, path="") -> list[str]:
    """The keys of `vllms` (a JSON body) that `ours` lacks, at any depth."""
    if isinstance(ours, dict) and isinstance(vllms, dict):
        return [m for key in vllms for m in ([f"{path}.{key}"] if key not in ours
                                             else _missing_keys(ours[key], vllms[key], f"{path}.{key}"))]
    if isinstance(ours, list) and isinstance(vllms, list):
        return [m for i, (a, b) in enumerate(zip(ours, vllms)) for m in _missing_keys(a, b, f"{path}[{i}]")]
    return []


def test_whole_answers_carry_every_key_of_vllms_bodies(server):
    """vLLM sends its whole answers as model_dump(): every field of its response models, null where
    it has nothing (message.reasoning, refusal, audio; prompt_logprobs, service_tier, usage's
    prompt_tokens_details, ...), so `reply.choices[0].message.reasoning` is None on vLLM, not an
    AttributeError; a completion stream's choices carry token_ids and prompt_token_ids (null unless
    asked for). Our bodies, read into vLLM's own models, must have each key their dump has."""
    pytest.importorskip("vllm", reason="the pinned vLLM is installed by scripts/setup-test-env.sh")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseStreamChoice

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for fields in ({}, {"logprobs": True, "top_logprobs": 2, "return_token_ids": True, "n": 2, "temperature": 1.0},
                   {"tools": tools, "tool_choice": "required", "max_tokens": 40}):
        reply = chat(server, "hi", **fields)
        assert reply["system_fingerprint"] and reply["choices"][0]["message"]["reasoning"] is None
        expected = ChatCompletionResponse.model_validate(reply).model_dump()
        assert not _missing_keys(reply, expected), (fields, _missing_keys(reply, expected))
    for fields in ({}, {"logprobs": 2}, {"echo": True, "return_token_ids": True}, {"prompt": ["hi", "ho"], "n": 2}):
        body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 3, "temperature": 1.0, **fields}
        reply = post(server, "/v1/completions", body).json()
        expected = CompletionResponse.model_validate(reply).model_dump()
        assert not _missing_keys(reply, expected), (fields, _missing_keys(reply, expected))
    stream_keys = set(CompletionResponseStreamChoice.model_fields)  # vLLM sets each one on every chunk
    for chunk in _stream(server, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 3,
                                                     "stream": True}):
        assert stream_keys <= set(chunk["choices"][0]), chunk


_TOP = {"id", "object", "created", "model", "choices"}
_USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}


def _chat_chunk_kind(chunk: dict, echo: bool, seen: int) -> str:
    if not chunk["choices"]:
        return "usage"
    choice = chunk["choices"][0]
    if "role" in choice["delta"]:
        return "role"
    if echo and seen == 1:
        return "echo"
    return "finish" if choice["finish_reason"] is not None else "token"


def _expected_chat_keys(kind: str, continuous: bool, include_usage: bool) -> tuple[set, set | None]:
    """vLLM 0.27's chat_completion_stream_generator: the keys each kind of chunk is built with (it
    sends model_dump_json(exclude_unset=True); the usage chunk also without nulls)."""
    usage = {"usage"} if continuous else set()
    choice = {"index", "delta", "logprobs", "finish_reason"}
    return {
        "role": (_TOP | {"prompt_token_ids", "prompt_text"} | usage, choice),
        "echo": (_TOP | usage, choice),
        "token": (_TOP | usage, choice | {"token_ids"}),
        "finish": (_TOP | usage | (set() if include_usage else {"system_fingerprint"}),
                   choice | {"token_ids", "stop_reason"}),
        "usage": (_TOP | {"usage", "system_fingerprint"}, None),
    }[kind]


def test_streamed_chat_chunks_carry_vllms_keys_and_no_others(server):
    """vLLM sends each chunk as model_dump_json(exclude_unset=True): the role chunk, the echo, token
    chunks (content, tool calls, logprobs), the finishing one, the usage chunk and continuous usage
    each have their own keys, and none that vLLM leaves out (a client that tells a key set to null
    from one left out sees the same chunks on both profiles)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}]
    messages = [{"role": "user", "content": "hi"}]
    cases = [{}, {"stream_options": {"include_usage": True}},
             {"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "logprobs": True,
              "top_logprobs": 2, "return_token_ids": True, "n": 2, "temperature": 1.0},
             {"messages": messages + [{"role": "assistant", "content": "Well,"}], "echo": True,
              "add_generation_prompt": False, "continue_final_message": True, "return_prompt_text": True},
             {"tools": tools, "tool_choice": "required", "max_tokens": 40}]
    for fields in cases:
        body = {"model": SERVED_NAME, "messages": messages, "max_tokens": 6, "stream": True, **fields}
        options = fields.get("stream_options", {})
        seen: dict[int, int] = {}
        kinds, calls = [], []
        for chunk in _stream(server, "/v1/chat/completions", body):
            index = chunk["choices"][0]["index"] if chunk["choices"] else -1
            kind = _chat_chunk_kind(chunk, bool(fields.get("echo")), seen.get(index, 0))
            seen[index] = seen.get(index, 0) + 1
            kinds.append(kind)
            top, choice = _expected_chat_keys(kind, bool(options.get("continuous_usage_stats")),
                                              bool(options.get("include_usage")))
            assert set(chunk) == top, (fields, kind, chunk)
            if "usage" in chunk:
                assert set(chunk["usage"]) == _USAGE, (fields, chunk)
            if choice is None:
                continue
            got = chunk["choices"][0]
            assert set(got) == choice, (fields, kind, chunk)
            delta = got["delta"]
            assert set(delta) <= {"role", "content", "tool_calls"} and None not in delta.values(), (fields, chunk)
            calls += delta.get("tool_calls", [])
            for entry in (got["logprobs"] or {}).get("content", []):
                assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}, chunk
                assert all(set(top_entry) == {"token", "logprob", "bytes"} for top_entry in entry["top_logprobs"])
        assert "finish" in kinds and kinds[0] == "role", (fields, kinds)
        assert ("usage" in kinds) == bool(options.get("include_usage")), (fields, kinds)
        if fields.get("echo"):
            assert kinds[1] == "echo"
        # hermes's deltas: a call's index, id, type and name first, then its arguments' pieces.
        assert [set(call) for call in calls[:2]] == ([{"index", "id", "type", "function"}, {"index", "function"}]
                                                     if fields.get("tools") else []), calls
        assert all(None not in call["function"].values() for call in calls)


def test_streamed_completion_chunks_carry_vllms_keys_and_no_others(server):
    """vLLM's completion stream: every choice with all seven keys, system_fingerprint on the last
    chunk (or on the usage chunk), continuous usage of three keys, the usage chunk without nulls."""
    choice = {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids"}
    for fields in ({}, {"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "logprobs": 2,
                        "return_token_ids": True},
                   {"echo": True, "stream_options": {"include_usage": True}}):
        body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 4, "stream": True, **fields}
        options = fields.get("stream_options", {})
        chunks = _stream(server, "/v1/completions", body)
        for chunk in chunks[:-1] if options.get("include_usage") else chunks:
            got = chunk["choices"][0]
            finishing = got["finish_reason"] is not None and not options.get("include_usage")
            assert set(chunk) == _TOP | ({"usage"} if options.get("continuous_usage_stats") else set()) | (
                {"system_fingerprint"} if finishing else set()), (fields, chunk)
            assert set(got) == choice, (fields, chunk)
            if "usage" in chunk:
                assert set(chunk["usage"]) == _USAGE
            if got["logprobs"] is not None:
                assert set(got["logprobs"]) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
        if options.get("include_usage"):
            assert set(chunks[-1]) == _TOP | {"usage", "system_fingerprint"} and chunks[-1]["choices"] == []
            assert set(chunks[-1]["usage"]) == _USAGE


def test_error_bodies_are_vllms(server):
    """vLLM 0.27's error bodies: a refusal its request models raise (VLLMValidationError) is the same
    body key for key, as its create_error_response makes it ("BadRequestError", the message ending
    in "(parameter=..., value=...)"); a body that does not validate is its validation handler's
    "Bad Request" with param "body.<path>" (its message lists pydantic's errors with their input:
    ours says the first in one line, docs/SERVICE.md); unknown model and route as vLLM's."""
    pytest.importorskip("vllm", reason="the pinned vLLM is installed by scripts/setup-test-env.sh")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.utils.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    chat_body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refusals = [
        ("/v1/chat/completions", ChatCompletionRequest, chat_body, fields) for fields in (
            {"stream_options": {"include_usage": True}}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": -2},
            {"top_logprobs": "x"}, {"cache_salt": ""}, {"tools": []}, {"tool_choice": "required"},
            {"tools": tools, "tool_choice": "bogus"}, {"tools": tools, "tool_choice": {"type": "function"}},
            {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}},
            {"response_format": {"type": "json_schema"}},
            {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}},
             "structured_outputs": {"regex": "a"}})
    ] + [
        ("/v1/completions", CompletionRequest, {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2}, fields)
        for fields in ({"prompt": ""}, {"logprobs": -1}, {"logprobs": "x"}, {"stream_options": {"include_usage": True}})
    ]
    for path, vllm_model, body, fields in refusals:
        with pytest.raises(VLLMValidationError) as vllm_error:
            vllm_model.model_validate({**body, **fields})
        assert post(server, path, {**body, **fields}).json() == create_error_response(vllm_error.value).model_dump()
    # What vLLM refuses past its request models, in its words (vllm/sampling_params.py, renderers/params.py).
    for fields, error in (
            ({"logprobs": True, "top_logprobs": 21}, {
                "message": "Requested sample logprobs of 21, which is greater than max allowed: 20 "
                           "(parameter=logprobs, value=21)", "param": "logprobs"}),
            ({"logit_bias": {"a": 1}}, {
                "message": "logit_bias contains key(s) that cannot be converted to integer token IDs: ['a'] "
                           "(parameter=logit_bias, value=['a'])", "param": "logit_bias"}),
            ({"max_tokens": 10**6}, {
                "message": "max_tokens=1000000 cannot be greater than max_model_len=max_total_tokens=512. Please "
                           "request fewer output tokens. (parameter=max_tokens, value=1000000)", "param": "max_tokens"}),
            ({"add_generation_prompt": True, "continue_final_message": True}, {
                "message": "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                "param": None})):
        assert post(server, "/v1/chat/completions", {**chat_body, **fields}).json() == {
            "error": {**error, "type": "BadRequestError", "code": 400}}, fields
    # vLLM's validation handler: "Bad Request", the path in the body.
    for raw, param in ((b'{"model": ', "body.10"), (b'{"messages": [], "max_tokens": "x"}', "body.max_tokens"),
                       (b'{"model": "m"}', "body.messages")):
        reply = httpx.post(server.base_url + "/v1/chat/completions", content=raw, timeout=60,
                           headers={**AUTH, "Content-Type": "application/json"})
        error = reply.json()["error"]
        assert reply.status_code == 400 and (error["type"], error["param"], error["code"]) == ("Bad Request", param, 400)
    reply = httpx.post(server.base_url + "/v1/chat/completions", content=b"{}", timeout=60,
                       headers={**AUTH, "Content-Type": "text/plain"})
    assert reply.json() == {"error": {"message": "1 validation error:\n  Unsupported Media Type: Only "
                                                 "'application/json' is allowed",
                                      "type": "Bad Request", "param": None, "code": 400}}
    assert post(server, "/v1/chat/completions", {**chat_body, "model": "nope"}).json() == {"error": {
        "message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}}
    assert post(server, "/v1/nothing", {}).json() == {"error": {"message": "Not Found", "type": "Not Found",
                                                                "param": None, "code": 404}}


def test_a_streamed_chat_echo_with_logprobs_has_the_answers_logprobs_like_vllm(server):
    """vLLM streams a chat echo as its own chunk, without logprobs (the prompt's, which its whole
    answer has in prompt_logprobs, are not streamed); the tokens' logprobs follow as in a whole answer."""
    chat_body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "Well,"}],
                 "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 3}
    chunks = _stream(server, "/v1/chat/completions", {**chat_body, "echo": True, "logprobs": True, "stream": True,
                                                      "temperature": 0})
    assert chunks[1]["choices"][0]["delta"] == {"content": "Well,"} and chunks[1]["choices"][0]["logprobs"] is None
    entries = [e for c in chunks[2:] if c["choices"] and c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    whole = chat(server, "hi", messages=chat_body["messages"], add_generation_prompt=False,
                 continue_final_message=True, max_tokens=3, logprobs=True)["choices"][0]
    assert [e["token"] for e in entries] == [e["token"] for e in whole["logprobs"]["content"]]


def test_cache_salt_keeps_prefixes_apart(server):
    text = "A long shared question about the street, the bakery and the tram stop. " * 6
    hits = lambda: metric(server, "vllm:prefix_cache_hits_total")  # noqa: E731
    chat(server, text, cache_salt="alice", max_tokens=2)
    before = hits()
    chat(server, text, cache_salt="bob", max_tokens=2)
    assert hits() == before  # another salt: nothing shared
    chat(server, text, cache_salt="alice", max_tokens=2)
    assert hits() > before


def test_stream_options_without_stream_and_top_logprobs_without_logprobs_are_400s_like_vllm(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}), 400,
                 "stream")
    assert_error(post(server, "/v1/chat/completions", {**body, "top_logprobs": 2}), 400, "logprobs")


# ---- /v1/completions -----------------------------------------------------------------------------


def test_completions_with_the_openai_sdk(server):
    client = server.client()
    reply = client.completions.create(model=SERVED_NAME, prompt="The street in the morning", temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 16  # vLLM's default max_tokens for completions
    streamed = client.completions.create(model=SERVED_NAME, prompt="The street in the morning", temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    echoed = client.completions.create(model=SERVED_NAME, prompt="The street", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("The street")
    ids = server.engine.tokenizer.encode("The street in the morning")
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text


def test_echo_with_max_tokens_0_answers_with_the_prompt_alone_as_vllm(server):
    """vLLM's echo without generation: the prompt, finish_reason length, the one token it samples
    counted in the usage and not shown; streamed the same. max_tokens 0 without echo stays a 400."""
    client = server.client()
    whole = client.completions.create(model=SERVED_NAME, prompt="The street", max_tokens=0, echo=True)
    assert whole.choices[0].text == "The street" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 1
    chunks = list(client.completions.create(model=SERVED_NAME, prompt="The street", max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The street"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    refused = httpx.post(server.base_url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                         json={"model": SERVED_NAME, "prompt": "The street", "max_tokens": 0}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens", refused.text


def test_echo_with_return_token_ids_gives_the_prompt_as_its_ids_like_vllm(server):
    """vLLM's completions do not detokenize the prompt for echo when return_token_ids is set: the
    text has no echo (the prompt is in prompt_token_ids), and token_ids are the generated tokens,
    with max_tokens 0 too (the one token it samples), whole and streamed."""
    body = {"model": SERVED_NAME, "prompt": "The street", "max_tokens": 3, "temperature": 0, "echo": True,
            "ignore_eos": True, "return_token_ids": True}
    plain = post(server, "/v1/completions", {**body, "echo": False}).json()["choices"][0]
    echoed = post(server, "/v1/completions", body).json()["choices"][0]
    assert echoed["text"] == plain["text"] and echoed["token_ids"] == plain["token_ids"]
    assert echoed["prompt_token_ids"] == plain["prompt_token_ids"]
    assert post(server, "/v1/completions", {**body, "return_token_ids": False}).json()["choices"][0]["text"] \
        == "The street" + plain["text"]
    only = post(server, "/v1/completions", {**body, "max_tokens": 0}).json()
    assert only["choices"][0]["text"] == "" and len(only["choices"][0]["token_ids"]) == 1
    assert only["usage"]["completion_tokens"] == 1
    chunks = [c for c in _stream(server, "/v1/completions", {**body, "max_tokens": 0, "stream": True}) if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ""
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == only["choices"][0]["token_ids"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == plain["prompt_token_ids"]
    streamed = [c for c in _stream(server, "/v1/completions", {**body, "stream": True}) if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in streamed) == plain["text"]


def test_completions_with_a_list_of_prompts_answer_each_in_turn_as_vllm(server):
    # LangChain's OpenAI LLM sends its batch as one list; vLLM answers prompt i's choice j at i * n + j.
    client = server.client()
    ids = server.engine.tokenizer.encode("A red car")
    alone = [client.completions.create(model=SERVED_NAME, prompt=p, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
             for p in ("The street in the morning", ids)]
    both = client.completions.create(model=SERVED_NAME, prompt=["The street in the morning", "A red car"],
                                     max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in both.choices] == [alone[0].choices[0].text, alone[1].choices[0].text]
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens
    sampled = client.completions.create(model=SERVED_NAME, prompt=["The street in the morning", "A red car"], n=2,
                                        max_tokens=5, temperature=1, extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3] and sampled.usage.completion_tokens == 20
    assert sampled.usage.prompt_tokens == both.usage.prompt_tokens  # each prompt counted once, not per choice
    by_ids = post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": [ids, ids], "max_tokens": 5,
                                              "temperature": 0}).json()
    assert [c["text"] for c in by_ids["choices"]] == [alone[1].choices[0].text] * 2
    one = client.completions.create(model=SERVED_NAME, prompt=["A red car"], max_tokens=5, temperature=0)
    assert [c.text for c in one.choices] == [alone[1].choices[0].text]
    # Refused as a whole, nothing generated: a stream of several, a bad prompt among them, more than the queue.
    assert_error(post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": ["a", "b"], "stream": True}),
                 400, "several prompts")
    assert_error(post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": ["a", ""]}), 400, "empty")
    many = server.engine.settings.max_queue + 1
    assert_error(post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": ["a"] * many}), 400, "prompts")
    assert client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_completions_token_ids_and_usage_where_vllm_puts_them(server):
    body = {"model": SERVED_NAME, "prompt": "hi there", "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 3,
            "ignore_eos": True, "return_token_ids": True}
    prompt_ids = post(server, "/tokenize", {"prompt": "hi there"}).json()["tokens"]
    reply = post(server, "/v1/completions", body).json()
    assert "prompt_token_ids" not in reply  # vLLM: on each choice
    assert [(c["prompt_token_ids"], len(c["token_ids"])) for c in reply["choices"]] == [(prompt_ids, 4)] * 2
    chunks = _stream(server, "/v1/completions", {**body, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    firsts, counted = {}, {0: 0, 1: 0}
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        index = choice["index"]
        if index in firsts:
            assert choice.get("prompt_token_ids") is None
        firsts.setdefault(index, choice.get("prompt_token_ids"))  # the first chunk of each choice carries them
        counted[index] += len(choice["token_ids"])
        assert chunk["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": counted[index],
                                  "total_tokens": len(prompt_ids) + counted[index]}
    assert firsts == {0: prompt_ids, 1: prompt_ids} and counted == {0: 4, 1: 4}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_completions_max_tokens_null_is_vllms_default(server):
    body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": None, "ignore_eos": True}
    assert post(server, "/v1/completions", body).json()["usage"]["completion_tokens"] == 16


def test_completions_logprobs_in_vllms_shape(server):
    reply = post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 4, "temperature": 0,
                                             "logprobs": 2}).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 4
    assert "".join(logprobs["tokens"]) == reply["choices"][0]["text"]
    assert logprobs["text_offset"][0] == 0 and all(len(top) >= 2 for top in logprobs["top_logprobs"])
    assert_error(post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "suffix": "x"}), 400, "suffix")
    assert_error(post(server, "/v1/completions", {"model": "nope", "prompt": "hi"}), 404, "does not exist")
    assert_error(post(server, "/v1/completions", {"model": SERVED_NAME, "prompt": ""}), 400, "empty")


# ---- /tokenize, /detokenize, /version, /health -----------------------------------------------------


def test_tokenize_a_prompt_and_chat_messages_and_detokenize(server):
    tok = server.engine.tokenizer
    text = post(server, "/tokenize", {"model": SERVED_NAME, "prompt": "hello street", "return_token_strs": True}).json()
    assert text["tokens"] == tok("hello street")["input_ids"] and text["count"] == len(text["tokens"])
    assert text["max_model_len"] == server.engine.max_model_len
    assert text["token_strs"] == tok.convert_ids_to_tokens(text["tokens"])
    content = [image_part(png_data_url()), {"type": "text", "text": "what?"}]
    messages = post(server, "/tokenize", {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}]})
    assert messages.json()["count"] == chat(server, content)["usage"]["prompt_tokens"]  # image tokens included
    back = post(server, "/detokenize", {"model": SERVED_NAME, "tokens": text["tokens"]}).json()
    assert back == {"prompt": "hello street"}
    assert_error(post(server, "/detokenize", {"tokens": [10**9]}), 400, "token ids")


def test_the_model_list_has_the_keys_of_vllms(server):
    """vLLM's /v1/models cards: id, object, created, owned_by, root, parent, max_model_len and the
    `permission` list (one ModelPermission each)."""
    pytest.importorskip("vllm", reason="the pinned vLLM is installed by scripts/setup-test-env.sh")
    from vllm.entrypoints.openai.engine.protocol import ModelList, ModelPermission

    listed = httpx.get(server.base_url + "/v1/models", headers=AUTH).json()
    assert not _missing_keys(listed, ModelList.model_validate(listed).model_dump())
    (card,) = listed["data"]
    assert card["id"] == SERVED_NAME and card["max_model_len"] == server.engine.max_model_len
    (permission,) = card["permission"]
    assert set(permission) == set(ModelPermission.model_fields)
    assert permission["object"] == "model_permission" and permission["allow_sampling"] is True
    assert server.client().models.list().data[0].id == SERVED_NAME


def test_version_and_health_like_vllm(server):
    assert httpx.get(server.base_url + "/version").json()["version"]
    health = httpx.get(server.base_url + "/health")
    assert health.status_code == 200 and health.content == b""


def test_browser_pages_may_call_the_api_as_on_vllm(server):
    """vLLM's CORS defaults (allowed_origins/methods/headers "*", no credentials): a web page's fetch
    with a key passes its preflight, and can read the answer."""
    origin = {"Origin": "http://localhost:3000"}
    preflight = httpx.options(server.base_url + "/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = httpx.post(server.base_url + "/v1/chat/completions", headers={**AUTH, **origin}, timeout=60,
                        json={"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"


def test_allowed_origins_limits_which_pages_may_call():
    from starlette.testclient import TestClient

    from service.api import create_app
    from service.settings import ServiceSettings

    preflight = {"Access-Control-Request-Method": "POST"}
    only = TestClient(create_app(ServiceSettings(allowed_origins="http://app.local, http://other.local")))
    assert only.options("/v1/models", headers={**preflight, "Origin": "http://other.local"}).status_code == 200
    refused = only.options("/v1/models", headers={**preflight, "Origin": "http://evil.example"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    nobody = TestClient(create_app(ServiceSettings(allowed_origins="")))
    assert "access-control-allow-origin" not in nobody.get("/health", headers={"Origin": "http://app.local"}).headers


def test_health_is_503_until_the_engine_serves(server):
    from service.api.routes import health
    from service.api.state import ServiceState
    from service.metrics import ServiceMetrics

    loading = ServiceState(server.settings, None, ServiceMetrics())
    assert asyncio.run(health(loading)).status_code == 503


# ---- metrics and the dashboard ---------------------------------------------------------------------


def test_every_series_the_dashboard_queries_is_on_the_8gb_services_metrics(server):
    chat(server, "fill the histograms", max_tokens=3)
    from prometheus_client.parser import text_string_to_metric_families

    exported = {s.name for f in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text)
                for s in f.samples}
    dashboard = json.loads((REPO / "docs" / "grafana" / "vlkit.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(vllm:[a-z0-9_]+|vlkit_[a-z0-9_]+)", target["expr"])}
    assert len(queried) >= 10
    assert queried <= exported, queried - exported
    assert all('model_name=~"$model_name"' in target["expr"] for panel in dashboard["panels"]
               for target in panel["targets"])
