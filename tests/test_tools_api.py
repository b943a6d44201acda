"""Tools over HTTP with the official openai SDK, on the tiny model: tool_choice required and named
always give well-formed calls (the grammar), streamed as OpenAI's deltas; auto and none answer in
text with the tools in the prompt; a history of calls and results is part of the prompt."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.conftest import API_KEY, SERVED_NAME, png_data_url

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"]}}}
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Find a word",
    "parameters": {"type": "object", "properties": {"word": {"type": "string", "maxLength": 10},
                                                    "exact": {"type": "boolean"}}, "required": ["word"]}}}
TOOLS = [ADD, LOOKUP]
SCHEMAS = {tool["function"]["name"]: dict(tool["function"]["parameters"], additionalProperties=False) for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def create(server, **fields):
    fields.setdefault("max_tokens", 400)
    fields.setdefault("tools", TOOLS)
    return server.client().chat.completions.create(model=SERVED_NAME, messages=fields.pop("messages", MESSAGES),
                                                   **fields)


def assert_valid_call(call, name=None):
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name in SCHEMAS and (name is None or call.function.name == name)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("attempt", range(3))
def test_required_gives_one_or_more_valid_calls(long_context_server, attempt):
    reply = create(long_context_server, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call)


def test_a_named_tool_is_called_once_with_finish_reason_stop(long_context_server):
    reply = create(long_context_server, tool_choice={"type": "function", "function": {"name": "lookup"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's rule for a named tool, and vLLM's
    assert len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], "lookup")


def test_parallel_tool_calls_false_gives_one_call(long_context_server):
    for _ in range(2):
        reply = create(long_context_server, tool_choice="required", parallel_tool_calls=False)
        assert len(reply.choices[0].message.tool_calls) == 1


def test_streamed_calls_come_as_openai_deltas(long_context_server):
    chunks = list(create(long_context_server, tool_choice="required", stream=True,
                         stream_options={"include_usage": True}))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index not in calls:  # the first delta of a call: its id, type and name
                assert delta.id.startswith("chatcmpl-tool-") and delta.type == "function" and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
            else:  # then fragments of the arguments
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
    assert calls and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streamed_calls_carry_every_token_id(long_context_server):
    body = {"model": SERVED_NAME, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 400,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", long_context_server.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    sent = sum(len(c["choices"][0].get("token_ids") or []) for c in chunks if c["choices"])
    assert sent == chunks[-1]["usage"]["completion_tokens"]  # the parser's held-back text too, as vLLM


def test_streamed_and_whole_answers_agree(long_context_server):
    whole = create(long_context_server, tool_choice={"type": "function", "function": {"name": "add"}}, seed=5)
    chunks = list(create(long_context_server, tool_choice={"type": "function", "function": {"name": "add"}}, seed=5,
                         stream=True))
    arguments = "".join(d.function.arguments or "" for c in chunks if c.choices
                        for d in (c.choices[0].delta.tool_calls or []))
    call = whole.choices[0].message.tool_calls[0]
    assert json.loads(arguments) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_auto_and_none_answer_in_text_with_the_tools_in_the_prompt(long_context_server):
    without = create(long_context_server, tools=None, max_tokens=8)
    auto = create(long_context_server, max_tokens=8)
    none = create(long_context_server, tool_choice="none", max_tokens=8)
    assert auto.usage.prompt_tokens == none.usage.prompt_tokens > without.usage.prompt_tokens + 100
    for reply in (auto, none):
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"


def test_a_call_and_its_result_in_the_history_are_in_the_prompt(long_context_server):
    first = create(long_context_server, tool_choice="required")
    calls = first.choices[0].message.tool_calls
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": "5"} for c in calls)]
    answer = create(long_context_server, messages=history, max_tokens=8)
    rendered = sum(len(c.function.arguments) for c in calls)  # the calls and results are not dropped
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + rendered // 3
    assert answer.choices[0].finish_reason == "length"


def test_a_tool_result_with_a_screenshot_is_in_the_prompt_with_its_image(long_context_server):
    """A tool result holding an image (a GUI agent's screenshot), as vLLM takes it: the template puts
    the image inside <tool_response>; images in system or assistant turns, which the template would
    drop, are still a 400 naming the message."""
    calls = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "cat"}'}}]

    def history(result):
        return MESSAGES + [{"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "tool_call_id": "call_1", "content": result}]

    text_only = create(long_context_server, messages=history([{"type": "text", "text": "here"}]), max_tokens=4)
    shot = create(long_context_server, max_tokens=4, messages=history(
        [{"type": "text", "text": "here"}, {"type": "image_url", "image_url": {"url": png_data_url(128, 128)}}]))
    assert shot.usage.prompt_tokens >= text_only.usage.prompt_tokens + 16  # 128x128 px: 16 merged tokens at least
    tokenized = httpx.post(long_context_server.base_url + "/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"messages": history([{"type": "image_url", "image_url": {"url": png_data_url()}}])},
                           timeout=60).json()
    assert tokenized["count"] > 0
    for role in ("system", "assistant"):
        payload = {"model": SERVED_NAME, "max_tokens": 4, "messages": [
            {"role": role, "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]}, *MESSAGES]}
        reply = httpx.post(long_context_server.base_url + "/v1/chat/completions", json=payload,
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.0.content", reply.text


def test_a_tool_call_about_an_image(long_context_server):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                             {"type": "text", "text": "Look this up."}]}]
    reply = create(long_context_server, messages=messages, tool_choice={"type": "function",
                                                                        "function": {"name": "lookup"}})
    assert_valid_call(reply.choices[0].message.tool_calls[0], "lookup")


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": []}, "tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "add"}}, "structured_outputs": {"choice": ["a"]}},
     None),  # vLLM names no parameter: the message names both
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "x", "type": "function",
                                                         "function": {"name": "add", "arguments": "{bad"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
])
def test_tool_mistakes_are_400_as_on_vllm(long_context_server, body, param):
    payload = {"model": SERVED_NAME, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **body}
    reply = httpx.post(long_context_server.base_url + "/v1/chat/completions", json=payload,
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_tokenize_renders_the_tools_as_a_chat_request_does(long_context_server):
    def tokenize(**fields):
        reply = httpx.post(long_context_server.base_url + "/tokenize", json={"messages": MESSAGES, **fields},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["count"]

    with_tools = tokenize(tools=TOOLS)
    assert with_tools > tokenize() + 100
    assert with_tools == create(long_context_server, max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_nested_too_deep_for_json_is_its_content(long_context_server, stream):
    """A tool-call block nested past Python's recursion (a regex makes the tiny model write one): the
    answer was a 500 after its whole generation, the stream broke off without [DONE]. As on vLLM, a
    block that does not parse leaves the whole answer as content; streamed, a block that never
    names its function sends nothing (vLLM's streaming parser neither)."""
    depth = 1100
    fields = dict(max_tokens=depth + 20, tools=[{"type": "function", "function": {"name": "f"}}],
                  extra_body={"structured_outputs": {"regex": "<tool_call>\\[{%d}" % depth}})
    if stream:
        chunks = list(create(long_context_server, stream=True, **fields))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        message = create(long_context_server, **fields).choices[0]
        content, finish = message.message.content, [message.finish_reason]
        assert not message.message.tool_calls
    assert content == ("" if stream else "<tool_call>" + "[" * depth) and finish == ["stop"]
