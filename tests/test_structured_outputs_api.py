"""Structured outputs over HTTP with the official openai SDK: response_format json_object/json_schema
and vLLM's structured_outputs (json, regex, choice, grammar), streamed and not, with images; the
refusals vLLM makes, as 400s naming the field, before anything is queued."""
from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import pytest

from tests.conftest import API_KEY, SERVED_NAME, png_data_url
from tests.test_structured_outputs import PERSON, closed

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def create(server, **fields):
    fields.setdefault("max_tokens", 300)
    return server.client().chat.completions.create(model=SERVED_NAME, messages=fields.pop("messages", MESSAGES), **fields)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json={"messages": MESSAGES, **body},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.mark.parametrize("strict", [True, False, None])
def test_json_schema_response_format_gives_valid_json(server, strict):
    json_schema = {"name": "person", "schema": PERSON, **({} if strict is None else {"strict": strict})}
    reply = create(server, response_format={"type": "json_schema", "json_schema": json_schema})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), closed(PERSON))


def test_json_object_response_format_gives_an_object(server):
    reply = create(server, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # any object may be long: max_tokens still applies, the JSON is cut (vLLM's behaviour)
        assert reply.choices[0].message.content.startswith("{")


def test_streamed_json_is_the_same_json_with_usage(server):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = create(server, response_format=response_format, seed=11)
    chunks = list(create(server, response_format=response_format, seed=11, stream=True,
                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    jsonschema.validate(json.loads(text), closed(PERSON))


def test_json_about_an_image(server):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                             {"type": "text", "text": "Who is this? JSON please."}]}]
    reply = create(server, messages=messages, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), closed(PERSON))
    assert reply.usage.prompt_tokens > 20  # the image's tokens are in the prompt


@pytest.mark.parametrize(("structured", "matches"), [
    ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), closed(PERSON)) is None),
    ({"json": json.dumps(PERSON), "disable_any_whitespace": True},
     lambda t: t == json.dumps(json.loads(t), separators=(",", ":"), ensure_ascii=False)),
    ({"regex": r"\d{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),  # \d: ASCII digits
    ({"choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
    ({"grammar": 'root ::= answer "."\nanswer ::= "yes" | "no"'}, lambda t: t in ("yes.", "no.")),
    ({"grammar": 'start: WORD ("," WORD)*\nWORD: /[a-z]{1,5}/'}, lambda t: re.fullmatch(r"[a-z]{1,5}(,[a-z]{1,5})*", t)),
    ({"json_object": True}, lambda t: t.startswith("{")),
], ids=["json", "compact-json", "regex", "choice", "gbnf", "lark", "json_object"])
def test_vllm_structured_outputs_are_followed(server, structured, matches):
    reply = create(server, extra_body={"structured_outputs": structured})
    assert matches(reply.choices[0].message.content), reply.choices[0].message.content


def test_max_tokens_still_cuts_a_json_answer(server):
    reply = create(server, max_tokens=3, response_format={"type": "json_schema",
                                                          "json_schema": {"name": "p", "schema": PERSON}})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"response_format": {"type": "json_schema"}}, "response_format", "'json_schema' field must be provided"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "Invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "structured_outputs", "none are"),
    ({"response_format": {"type": "structural_tag", "format": {}}}, "response_format", "not supported"),
    ({"response_format": {"type": "yaml"}}, "body.response_format.type", ""),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "Invalid regex"),
    ({"structured_outputs": {"grammar": "root ::= nothing_here"}}, "structured_outputs.grammar", "Invalid grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "multiple are specified"),
    ({"structured_outputs": {}}, "structured_outputs", "none are specified"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "empty list"),
    ({"structured_outputs": {"grammar": "  "}}, "structured_outputs.grammar", "empty string"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object", "must be True"),
    ({"structured_outputs": {"regex": "x"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "multiple are specified"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
])
def test_bad_constraints_are_400_naming_the_field_and_nothing_is_queued(server, body, param, says):
    before = server.engine.scheduler.metrics.prompt_tokens._value.get()
    reply = post(server, {"max_tokens": 5, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert server.engine.scheduler.metrics.prompt_tokens._value.get() == before  # never admitted
    assert create(server, max_tokens=2).choices[0].finish_reason == "length"  # the server goes on


def test_a_schema_is_compiled_once_off_the_event_loop_and_the_engine_thread(server):
    grammars = server.engine.grammars
    compile_, threads = grammars._compile, []

    def spy(constraint):
        threads.append(threading.current_thread().name)
        return compile_(constraint)

    grammars._compile = spy
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    try:
        for _ in range(3):
            create(server, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    finally:
        grammars._compile = compile_
    assert len(threads) == 1 and threads[0] not in ("vlkit-engine", "uvicorn", "MainThread")


def test_completions_take_structured_outputs_too(server):
    client = server.client()
    choice = client.completions.create(model=SERVED_NAME, prompt="The sky is", max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": ["blue", "grey"]}})
    assert choice.choices[0].text in ("blue", "grey") and choice.choices[0].finish_reason == "stop"
    reply = client.completions.create(model=SERVED_NAME, prompt="A person:", max_tokens=300, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}})
    jsonschema.validate(json.loads(reply.choices[0].text), closed(PERSON))
    bad = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "structured_outputs": {"regex": "("}},
                     headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs.regex"


# Strings that escaping gets wrong, and prefixes of others ("1" of "10"): each must come out as written.
LARGE_CHOICE = [f"opt{i}" for i in range(2500)] + [f'{i}: "q" \\ é😀\tend\n' for i in range(2500)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_choice_of_thousands_of_strings_answers_one_of_them(server, stream):
    """2000+ choices were past llguidance's parser (a 400, "max is 2000"): one lexer terminal takes them."""
    reply = create(server, max_tokens=40, stream=stream, extra_body={"structured_outputs": {"choice": LARGE_CHOICE}})
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    assert text in LARGE_CHOICE and finish == ["stop"], (text, finish)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_grammar_past_the_grammar_engines_limits_is_a_400_not_an_answer_outside_it(server, stream):
    """A rule of 2000+ alternatives: llguidance gives up at the first token; the answer was "o",
    finish_reason stop."""
    body = {"model": SERVED_NAME, "max_tokens": 10, "stream": stream,
            "structured_outputs": {"grammar": "start: " + " | ".join(f'"opt{i}"' for i in range(2500))}}
    response = post(server, body)
    if stream:
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert lines[-1] == "data: [DONE]"
        assert not any('"content":"o' in line for line in lines)
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
    assert error["code"] == 400 and "max is 2000" in error["message"]
