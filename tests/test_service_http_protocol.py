"""A chat request converts itself: to the engine's sampling arguments and to the chat template's
messages (no server needed; the HTTP tests cover the same rules end to end)."""
from __future__ import annotations

import inspect

import pytest

from service.api.protocol import ChatCompletionRequest
from service.engine import Engine
from service.errors import InvalidRequest


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate(fields)


def test_sampling_fields_are_engine_prepare_arguments():
    fields = chat(max_tokens=9, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop="x", ignore_eos=True)
    inspect.signature(Engine.prepare).bind(None, [], [], **fields.to_sampling_fields())  # names the engine takes
    assert fields.to_sampling_fields() == {"max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 3,
                                           "seed": 7, "stop": ("x",), "ignore_eos": True}


@pytest.mark.parametrize(("top_k", "expected"), [(None, None), (-1, 0), (0, 0), (5, 5)])
def test_top_k_minus_one_and_zero_both_mean_off(top_k, expected):
    assert chat(top_k=top_k).to_sampling_fields()["top_k"] == expected


def test_unset_fields_leave_the_model_defaults_and_max_completion_tokens_wins():
    fields = chat().to_sampling_fields()
    assert fields["max_tokens"] is None and fields["temperature"] is None and fields["stop"] == ()
    assert chat(max_tokens=4, max_completion_tokens=6).to_sampling_fields()["max_tokens"] == 6
    assert chat(stop=["a", "b"]).to_sampling_fields()["stop"] == ("a", "b")


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
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "image"}]},
    ]


def test_an_image_outside_a_user_message_is_refused_by_position():
    request = chat(messages=[{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [{"type": "image_url", "image_url": "data:x"}]}])
    with pytest.raises(InvalidRequest) as info:
        request.chat_messages()
    assert info.value.param == "messages.1.content" and "'assistant'" in info.value.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 2}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_fields_not_honoured_are_refused_by_name(fields, param):
    with pytest.raises(InvalidRequest) as info:
        chat(**fields).check_supported()
    assert info.value.param == param and info.value.kind == "unsupported"


def test_neutral_values_are_accepted():
    chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, tools=[],
         response_format={"type": "text"}).check_supported()
