"""The official openai SDK's structured-output helpers against the real service on the tiny model:
`chat.completions.parse` with a pydantic model (strict json_schema) and with a strict function tool,
and the streaming helper with usage."""
from __future__ import annotations

import openai
from pydantic import BaseModel, Field

from tests.clients.pet import QUESTION, Pet
from tests.conftest import SERVED_NAME
from tests.loopback_only import loopback_only  # noqa: F401 - autouse

MESSAGES = [{"role": "user", "content": QUESTION}]


class Lookup(BaseModel):
    """Look a word up in the dictionary."""

    word: str = Field(max_length=10)


def test_parse_returns_the_pydantic_model(long_context_server):
    completion = long_context_server.client().chat.completions.parse(
        model=SERVED_NAME, messages=MESSAGES, response_format=Pet, max_tokens=300)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Pet) and message.refusal is None


def test_parse_with_a_strict_function_tool_gives_parsed_arguments(long_context_server):
    completion = long_context_server.client().chat.completions.parse(
        model=SERVED_NAME, messages=MESSAGES, tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice="required", max_tokens=300)
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "Lookup" and isinstance(call.function.parsed_arguments, Lookup)
    assert completion.choices[0].finish_reason == "tool_calls"


def test_the_streaming_helper_parses_and_reports_usage(long_context_server):
    with long_context_server.client().chat.completions.stream(
            model=SERVED_NAME, messages=MESSAGES, response_format=Pet, max_tokens=300,
            stream_options={"include_usage": True}) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Pet)
    assert "".join(deltas) == final.choices[0].message.content
    assert final.usage.completion_tokens > 0 and final.usage.prompt_tokens > 0
