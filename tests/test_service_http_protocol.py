"""A chat request converts itself: to the engine's sampling arguments and to the chat template's
messages (no server needed; the HTTP tests cover the same rules end to end)."""
from __future__ import annotations

import inspect
import json

import pytest

from service.api.protocol import ChatCompletionRequest
from service.engine import Engine
from service.errors import InvalidRequest


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate(fields)


def test_engine_options_are_engine_prepare_arguments():
    fields = chat(max_tokens=9, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop="x", ignore_eos=True,
                  presence_penalty=0.5, logprobs=True, top_logprobs=2, bad_words=["no"], min_p=0.1)
    options = fields.to_engine_options()
    inspect.signature(Engine.prepare).bind(None, [], [], **options)  # names the engine takes
    from service.engine.prompts import PromptBuilder

    inspect.signature(PromptBuilder.request).bind(None, [], [], **options)
    assert options["stop"] == ("x",) and options["logprobs"] == 2 and options["presence_penalty"] == 0.5
    assert options["bad_words"] == ("no",) and options["seed"] == 7 and options["top_k"] == 3


@pytest.mark.parametrize(("top_k", "expected"), [(None, None), (-1, 0), (0, 0), (5, 5)])
def test_top_k_minus_one_and_zero_both_mean_off(top_k, expected):
    assert chat(top_k=top_k).to_engine_options()["top_k"] == expected


def test_unset_fields_leave_the_model_defaults_and_max_completion_tokens_wins():
    fields = chat().to_engine_options()
    assert fields["max_tokens"] is None and fields["temperature"] is None and fields["stop"] == ()
    assert fields["logprobs"] is None  # logprobs false: none, whatever top_logprobs says
    assert chat(max_tokens=4, max_completion_tokens=6).to_engine_options()["max_tokens"] == 6
    assert chat(stop=["a", "b"]).to_engine_options()["stop"] == ("a", "b")
    assert chat(seed=-1).to_engine_options()["seed"] is None  # vLLM: -1 is no seed


def test_chat_messages_keep_the_image_order_and_map_developer_to_system():
    request = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": "data:one"},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "data:two"}}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:three"}}]},
    ])
    messages, urls = request.chat_messages()
    assert urls == ["data:one", "data:two", "data:three"]
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": []},  # as vLLM hands it to the template: text parts, here none
        {"role": "user", "content": [{"type": "image"}]},
    ]


def test_an_image_outside_a_user_message_is_refused_by_position():
    request = chat(messages=[{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [{"type": "image_url", "image_url": "data:x"}]}])
    with pytest.raises(InvalidRequest) as info:
        request.chat_messages()
    assert info.value.param == "messages.1.content" and "'assistant'" in info.value.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"use_beam_search": True}, "use_beam_search"), ({"priority": 1}, "priority"),
    ({"chat_template": "{{ messages }}"}, "chat_template"), ({"documents": [{"text": "x"}]}, "documents"),
    ({"media_io_kwargs": {"image": {}}}, "media_io_kwargs"), ({"length_penalty": 2}, "length_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"top_logprobs": 2}, "top_logprobs"),
])
def test_refused_fields_and_vllm_rules_name_the_field(fields, param):
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest.parse(json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode())
    assert info.value.param == param, info.value.message


def test_neutral_values_are_accepted():
    request = chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, response_format={"type": "text"},
                   use_beam_search=False, priority=0, length_penalty=1.0, include_reasoning=True)
    assert request.answer_constraint() is None and request.tool_call_answer() is None


@pytest.mark.parametrize(("part", "param"), [
    ({"type": "text"}, "messages.0.content.0.text"),
    ({"type": "text", "text": None}, "messages.0.content.0.text"),
    ({"type": "image_url", "image_url": {"url": "data:x", "detail": "ultra"}}, "messages.0.content.0.image_url.detail"),
])
def test_a_bad_content_part_is_named_by_its_path_in_the_body(part, param):
    """The path a client can follow in its own request: no `type` tag of the part repeated in it."""
    body = {"messages": [{"role": "user", "content": [part]}]}
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest.parse(json.dumps(body).encode())
    assert info.value.param == "body." + param and info.value.message.startswith(param + ": ")
