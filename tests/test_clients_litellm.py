"""litellm against the real service on the tiny model, as an OpenAI-compatible (hosted vLLM)
endpoint: a pydantic response_format, a required tool call, streaming with usage."""
from __future__ import annotations

import json
import os

import pytest

from tests.clients.pet import QUESTION, Pet
from tests.conftest import API_KEY, SERVED_NAME
from tests.loopback_only import loopback_only  # noqa: F401 - autouse

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its own copy, not a download at import

MESSAGES = [{"role": "user", "content": QUESTION}]
ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}}


@pytest.fixture
def completion(long_context_server):
    import litellm

    def call(**kwargs):
        kwargs.setdefault("max_tokens", 300)
        return litellm.completion(model=f"hosted_vllm/{SERVED_NAME}", api_base=long_context_server.base_url + "/v1",
                                  api_key=API_KEY, messages=MESSAGES, num_retries=0, **kwargs)
    return call


def test_a_pydantic_response_format_gives_a_valid_object(completion):
    response = completion(response_format=Pet)
    Pet.model_validate_json(response.choices[0].message.content)
    assert response.choices[0].finish_reason == "stop"


def test_a_required_tool_call(completion):
    response = completion(tools=[ADD], tool_choice="required")
    (call,) = response.choices[0].message.tool_calls[:1]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "add" and set(arguments) == {"a", "b"}
    assert response.choices[0].finish_reason == "tool_calls"


def test_streaming_with_usage(completion):
    chunks = list(completion(max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert text and usage and usage[-1].completion_tokens == 10
