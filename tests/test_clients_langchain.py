"""LangChain's ChatOpenAI against the real service on the tiny model: `with_structured_output` by its
default method (json_schema) and by function calling, a forced tool call, streaming with usage."""
from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import Field

from tests.clients.pet import QUESTION, Pet
from tests.conftest import API_KEY, SERVED_NAME
from tests.loopback_only import loopback_only  # noqa: F401 - autouse


@pytest.fixture
def llm(long_context_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=SERVED_NAME, base_url=long_context_server.base_url + "/v1", api_key=API_KEY,
                      max_retries=0, timeout=60, max_tokens=300)


def test_with_structured_output_default_method_returns_the_model(llm):
    assert isinstance(llm.with_structured_output(Pet).invoke(QUESTION), Pet)


def test_with_structured_output_by_function_calling(llm):
    assert isinstance(llm.with_structured_output(Pet, method="function_calling").invoke(QUESTION), Pet)


def test_a_forced_tool_call_has_valid_arguments(llm):
    from langchain_core.tools import tool

    @tool
    def add(a: Annotated[int, Field(ge=0, le=99)], b: Annotated[int, Field(ge=0, le=99)]) -> int:
        """Add two numbers."""
        return a + b

    message = llm.bind_tools([add], tool_choice="add").invoke("What is 2 + 3?")
    (call,) = message.tool_calls
    assert call["name"] == "add" and add.invoke(call["args"]) == call["args"]["a"] + call["args"]["b"]
    assert not message.invalid_tool_calls


def test_streaming_reports_usage(llm):
    chunks = list(llm.bind(max_tokens=12).stream(QUESTION, stream_usage=True))
    usage = sum(chunks[1:], chunks[0]).usage_metadata
    assert usage["output_tokens"] == 12 and usage["input_tokens"] > 0


def test_the_completions_llm_sends_its_batch_as_one_list(long_context_server):
    # langchain_openai.OpenAI (the completions LLM) puts up to 20 prompts in one /v1/completions request.
    from langchain_openai import OpenAI

    llm = OpenAI(model=SERVED_NAME, base_url=long_context_server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                 timeout=60, max_tokens=4, temperature=0)
    result = llm.generate(["The street in the morning", "A red car", "hi"])
    assert [len(g) for g in result.generations] == [1, 1, 1]
    assert [g[0].text for g in result.generations] == [llm.invoke(p) for p in ("The street in the morning",
                                                                              "A red car", "hi")]
    assert result.llm_output["token_usage"]["completion_tokens"] <= 12
