"""Tools without a server: the prompt Qwen3-VL's template makes of tools and of a tool-call history
(exactly the official template's text), the Hermes parser against vLLM's own `hermes` parser on the
same outputs, and the tool-call grammar."""
from __future__ import annotations

import json
import os

import pytest

from service.api.protocol import ChatCompletionRequest
from service.api.tool_parser import StreamingToolParser, ToolCallAnswer, parse_tool_calls
from service.engine.loading import load_processor
from service.errors import InvalidRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}

# What the official Qwen3-VL Instruct template renders for this conversation (tools in the system
# turn, the calls in the assistant turn, the results as one user turn of <tool_response> blocks).
HISTORY_PROMPT = """<|im_start|>system
Be brief.

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
{"type": "function", "function": {"name": "get_time", "description": null, "parameters": null}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
<|im_start|>user
Weather and time in Paris?<|im_end|>
<|im_start|>assistant
Let me check.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_call>
{"name": "get_time", "arguments": {}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
sunny, 21 C
</tool_response>
<tool_response>
14:05
</tool_response><|im_end|>
<|im_start|>assistant
"""


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate(fields)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


def render(processor, request: ChatCompletionRequest) -> str:
    messages, _ = request.chat_messages()
    return processor.apply_chat_template(messages, tools=request.template_tools(), add_generation_prompt=True,
                                         tokenize=False)


def test_tools_and_a_tool_call_history_render_as_the_official_template_does(processor):
    request = chat(tools=[WEATHER, CLOCK], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
    ])
    assert render(processor, request) == HISTORY_PROMPT


def test_a_call_without_text_starts_the_turn_and_tool_choice_none_still_shows_the_tools(processor):
    request = chat(tools=[WEATHER], tool_choice="none", messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "snow"}])
    prompt = render(processor, request)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsnow\n</tool_response><|im_end|>') in prompt


def test_tool_call_arguments_that_are_not_json_are_refused_by_place():
    request = chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(InvalidRequest) as info:
        request.chat_messages()
    assert info.value.param == "messages.1.tool_calls.0.function.arguments"


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"tools": []}, "tools", "must not be an empty array"),
    ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ({"tool_choice": "auto"}, "tool_choice", "`tools` must be set"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "`tools` must be set"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "Invalid value for `tool_choice`"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice.function", ""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", ""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": ""}}}, "tool_choice.function.name",
     ""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "does not match any"),
])
def test_tool_usage_is_refused_as_vllm_refuses_it(fields, param, says):
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest.parse(json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode())
    assert info.value.param == param and says in info.value.message


def test_tools_default_to_auto_and_none_without_tools():
    assert chat(tools=[WEATHER]).tool_choice == "auto"
    assert chat(tool_choice="none").tool_choice == "none" and chat().tool_call_answer() is None
    assert chat(tools=[WEATHER], tool_choice="none").tool_call_answer() is None


def test_named_tool_choice_and_structured_outputs_together_are_refused():
    request = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                   structured_outputs={"regex": "a"})
    with pytest.raises(InvalidRequest) as info:
        request.answer_constraint()
    assert "not both" in info.value.message


def test_which_tool_choices_constrain_the_answer():
    assert chat(tools=[WEATHER]).answer_constraint() is None  # auto: free text, parsed afterwards
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    assert "TEXT (call TEXT)*" in chat(tools=[strict]).answer_constraint().spec
    required = chat(tools=[WEATHER, CLOCK], tool_choice="required", response_format={"type": "json_object"})
    grammar = required.answer_constraint()
    assert grammar.kind == "lark" and grammar.source == "tools" and "call_1" in grammar.spec  # replaces the format
    named = chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert '"get_time' in named.answer_constraint().spec and "get_weather" not in named.answer_constraint().spec
    single = chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False).answer_constraint()
    assert "start: call\n" in single.spec


# ---- the Hermes parser, against vLLM's own --------------------------------------------------------

OUTPUTS = [
    "Just text, no call.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "a \\"quoted\\" }"}}</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut by max_tokens
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}',  # complete, closing tag missing
    '<tool_call>\n{"name": "get_weather"}\n</tool_call>',  # no arguments
    'text <tool_call>not json</tool_call>',
    "ends with <tool_",
]


@pytest.fixture(scope="module")
def vllm_hermes(tiny_model_dir):
    try:
        from transformers import AutoTokenizer
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest
        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    except ImportError as exc:  # CI installs vLLM (scripts/setup-test-env.sh): there this is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"vLLM's parser is not importable: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    request = VllmRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, CLOCK])
    return lambda: Hermes2ProToolParser(tokenizer), request


@pytest.mark.parametrize("output", OUTPUTS)
def test_whole_answers_parse_as_vllm_parses_them(vllm_hermes, output):
    make, request = vllm_hermes
    theirs = make().extract_tool_calls(output, request)
    content, calls = parse_tool_calls(output)
    assert content == theirs.content
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == \
        [(c.type, c.function.name, c.function.arguments) for c in theirs.tool_calls]
    assert all(c.id.startswith("chatcmpl-tool-") for c in calls)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_answers_give_the_deltas_vllm_gives(vllm_hermes, output, step):
    make, request = vllm_hermes
    theirs, ours = make(), StreamingToolParser()
    their_content, their_calls, our_content, our_calls = [], [], [], []
    for end in range(step, len(output) + step, step):
        previous, current = output[:end - step], output[:end]
        delta = theirs.extract_tool_calls_streaming(previous, current, current[len(previous):], [], [], [], request)
        if delta is not None:
            their_content.append(delta.content or "")
            their_calls += [c.model_dump(exclude_none=True) for c in delta.tool_calls]
        content, calls = ours.feed(current)
        our_content.append(content or "")
        our_calls += [c.model_dump() for c in calls]
    assert "".join(our_content) == "".join(their_content)
    strip_ids = [{k: v for k, v in c.items() if k != "id"} for c in our_calls]
    assert strip_ids == [{k: v for k, v in c.items() if k != "id"} for c in their_calls]
    for call in our_calls:  # OpenAI's shape: the first delta of a call has id, type and name, no arguments
        if "id" in call:
            assert call["type"] == "function" and set(call["function"]) == {"name"}
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}


DEEP = "<tool_call>" + "[" * 5000  # a model's answer nested deeper than Python's json recurses


def test_a_deeply_nested_answer_is_content_as_vllm_answers_it(vllm_hermes):
    """json.loads raised RecursionError (a 500 after the whole generation); vLLM's parser takes any
    error as "no tool calls": the answer is the content."""
    make, request = vllm_hermes
    theirs = make().extract_tool_calls(DEEP, request)
    assert parse_tool_calls(DEEP) == (theirs.content, []) == (DEEP, [])
    assert ToolCallAnswer().message(DEEP, "length") == (DEEP, [], "length")


def test_a_deeply_nested_streamed_answer_is_read_without_an_error():
    """The streaming parser tries each delta's block as JSON: that raised too (the stream broke off)."""
    parser = StreamingToolParser()
    assert parser.feed(DEEP) == (None, [])
    assert parser.feed(DEEP + "]", finished=True) == (None, [])


def test_a_held_back_tag_start_is_content_when_the_answer_ends():
    parser = StreamingToolParser()
    assert parser.feed("see <tool_") == ("see ", [])
    assert parser.feed("see <tool_", finished=True) == ("<tool_", [])


@pytest.mark.parametrize(("answer", "text", "finish", "expected"), [
    (ToolCallAnswer(), OUTPUTS[2], "stop", ("Sure.\n", 2, "tool_calls")),
    (ToolCallAnswer(), OUTPUTS[2], "length", ("Sure.\n", 2, "tool_calls")),
    (ToolCallAnswer(), OUTPUTS[0], "stop", (OUTPUTS[0], 0, "stop")),
    (ToolCallAnswer(required=True), OUTPUTS[1], "stop", ("", 1, "tool_calls")),
    (ToolCallAnswer(required=True), OUTPUTS[4], "length", (OUTPUTS[4], 0, "length")),
    (ToolCallAnswer(named=True), OUTPUTS[1], "stop", ("", 1, "stop")),
    (ToolCallAnswer(parallel=False), OUTPUTS[2], "stop", ("Sure.\n", 1, "tool_calls")),
])
def test_tool_call_answers_follow_vllms_rules(answer, text, finish, expected):
    content, calls, reason = answer.message(text, finish)
    assert (content, len(calls), reason) == expected
