"""vLLM's truncate_prompt_tokens and truncation_side on the real server, through the openai SDK: the
prompt cut to its last (or first) N tokens before it runs, as the pinned vLLM's own TokenizeParams
cuts it (its class computes the expected ids), chat and completions, streamed and not; an image
counted as its one placeholder token and kept whole, as vLLM counts it; vLLM's refusals in its words."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.conftest import API_KEY, SERVED_NAME, png_data_url
from tests.test_service_api import image_part

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 512  # the server fixture's max_model_len
LONG = " ".join(f"item{i} is here" for i in range(200))  # more tokens than the context holds


def vllm_error(build) -> str:
    """The message (with its parameter and value) of the VLLMValidationError `build` raises."""
    with pytest.raises(Exception) as info:
        build()
    assert type(info.value).__name__ == "VLLMValidationError"
    return str(info.value)


def vllm_cut(ids: list[int], keep: int, side: str | None, max_tokens: int | None) -> list[int]:
    """The ids vLLM runs for a prompt of `ids`: its TokenizeParams as the routes build it, and its
    tokenizer's own side where the request names none ("left" for generation: its tokenizer registry)."""
    params = pytest.importorskip("vllm.renderers.params").TokenizeParams(
        max_total_tokens=CONTEXT, max_output_tokens=max_tokens or 0, truncate_prompt_tokens=keep,
        truncation_side=side)
    return params._token_truncation(SimpleNamespace(truncation_side="left"), list(ids))


def tokenize(server, **body) -> list[int]:
    response = httpx.post(server.base_url + "/tokenize", json={"model": SERVED_NAME, **body}, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_completions_run_the_last_or_first_tokens_vllm_keeps(server):
    client = server.client()
    whole = tokenize(server, prompt=LONG)
    assert len(whole) > CONTEXT
    with pytest.raises(openai.BadRequestError):  # without truncation it does not fit
        client.completions.create(model=SERVED_NAME, prompt=LONG, max_tokens=4)
    for keep, side in ((7, None), (7, "left"), (7, "right"), (-1, None), (-1, "right")):
        fields = {"truncate_prompt_tokens": keep, **({"truncation_side": side} if side else {})}
        reply = client.completions.create(model=SERVED_NAME, prompt=LONG, max_tokens=4, temperature=0,
                                          extra_body={**fields, "return_token_ids": True})
        expected = vllm_cut(whole, keep, side, 4)
        assert len(expected) == (7 if keep == 7 else CONTEXT - 4)
        assert reply.choices[0].prompt_token_ids == expected, (keep, side)
        assert reply.usage.prompt_tokens == len(expected)
        # The model ran those tokens: the answer is the one to them given as the prompt.
        cut = client.completions.create(model=SERVED_NAME, prompt=expected, max_tokens=4, temperature=0)
        assert reply.choices[0].text == cut.choices[0].text
        chunks = list(client.completions.create(model=SERVED_NAME, prompt=LONG, max_tokens=4, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={**fields, "return_token_ids": True}))
        assert chunks[0].choices[0].prompt_token_ids == expected
        assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
        assert chunks[-1].usage.prompt_tokens == len(expected)
    tokens = client.completions.create(model=SERVED_NAME, prompt=whole, max_tokens=4, extra_body={
        "truncate_prompt_tokens": 9, "truncation_side": "right", "return_token_ids": True})
    assert tokens.choices[0].prompt_token_ids == whole[:9]  # a prompt of token ids is cut too


def test_chat_prompts_are_cut_after_the_chat_template(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG[:600]}]
    whole = tokenize(server, messages=messages)
    for keep, side in ((20, None), (20, "right")):
        fields = {"truncate_prompt_tokens": keep, **({"truncation_side": side} if side else {}), "return_token_ids": True}
        reply = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4, temperature=0,
                                               extra_body=fields)
        expected = vllm_cut(whole, keep, side, 4)
        assert reply.prompt_token_ids == expected and reply.usage.prompt_tokens == keep
        chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4,
                                                     temperature=0, stream=True, extra_body=fields,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].prompt_token_ids == expected and chunks[-1].usage.prompt_tokens == keep
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content


def test_an_image_counts_as_one_token_and_is_kept_whole_or_refused(server):
    """vLLM cuts the chat template's tokens, where an image is still its one placeholder, and then
    expands the placeholders it kept: the usage counts the image's tokens. A cut that drops an image
    fails in vLLM's processor (500); here it is a 400 naming the field."""
    client = server.client()
    pad = server.engine.prompts.image_token_id
    text = {"type": "text", "text": "Describe this picture in detail, please."}
    messages = [{"role": "user", "content": [text, image_part(png_data_url())]}]
    whole = tokenize(server, messages=messages)
    image = [i for i, t in enumerate(whole) if t == pad]
    assert len(image) > 1 and image == list(range(image[0], image[-1] + 1))
    as_vllm_counts = whole[:image[0] + 1] + whole[image[-1] + 1:]  # the image as its one placeholder
    keep = len(as_vllm_counts) - image[0]  # the image's placeholder and what follows it
    cut = vllm_cut(as_vllm_counts, keep, None, 4)
    assert cut[0] == pad
    expected = [pad] * len(image) + cut[1:]  # vLLM's processor expands the placeholder it kept
    reply = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"truncate_prompt_tokens": keep, "return_token_ids": True})
    assert reply.prompt_token_ids == expected
    assert reply.usage.prompt_tokens == len(expected) == keep + len(image) - 1
    for fields in ({"truncate_prompt_tokens": keep - 1}, {"truncate_prompt_tokens": 5, "truncation_side": "right"}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4, extra_body=fields)
        assert info.value.body["param"] == "truncate_prompt_tokens" and "image" in info.value.body["message"]


def test_vllms_refusals_in_its_words(server):
    vllm_params = pytest.importorskip("vllm.renderers.params")
    sampling = pytest.importorskip("vllm.sampling_params")
    client = server.client()
    too_many = vllm_error(lambda: vllm_params.TokenizeParams(
        max_total_tokens=CONTEXT, max_output_tokens=4, truncate_prompt_tokens=600, max_total_tokens_param="max_model_len",
        max_output_tokens_param="max_tokens"))
    for create in (lambda **f: client.chat.completions.create(model=SERVED_NAME, max_tokens=4, extra_body=f,
                                                              messages=[{"role": "user", "content": "hi"}]),
                   lambda **f: client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=4, extra_body=f)):
        with pytest.raises(openai.BadRequestError) as info:
            create(truncate_prompt_tokens=600)
        assert info.value.body["message"] == too_many and info.value.body["param"] == "truncate_prompt_tokens"
        for name, value in (("truncate_prompt_tokens", -2), ("truncation_side", "middle")):
            with pytest.raises(openai.BadRequestError) as info:
                create(**{name: value})
            assert info.value.body["param"] == f"body.{name}"
    # -1 with no max_tokens keeps the whole context: no token is left for the answer (vLLM's words).
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": LONG}],
                                       extra_body={"truncate_prompt_tokens": -1})
    assert info.value.body["message"] == vllm_error(lambda: sampling.SamplingParams(max_tokens=0))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=4, extra_body={"truncate_prompt_tokens": 0})
    assert info.value.body["message"] == "The decoder prompt cannot be empty"  # vLLM's input processor's words
    reply = client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=2, extra_body={"truncation_side": "left"})
    assert reply.usage.prompt_tokens == len(tokenize(server, prompt="hi"))  # a side alone cuts nothing, as on vLLM
