"""pydantic-ai against the real service on the tiny model, through its OpenAI chat model: native
output (response_format json_schema), prompted output (the schema in the instructions,
response_format json_object), tool output (its default: a forced call of its output tool) and a
function-tool round trip (the call, the tool's result sent back, then an answer)."""
from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from tests.clients.pet import QUESTION, Pet
from tests.conftest import API_KEY, SERVED_NAME
from tests.loopback_only import loopback_only  # noqa: F401 - autouse


class Note(BaseModel):
    """Prompted output is held to "a JSON object" only: random weights give one with keys of their own
    choosing, which this model (every field has a default; other keys are ignored) takes."""

    mood: str = "unknown"


@pytest.fixture
def model(long_context_server):
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=long_context_server.base_url + "/v1", api_key=API_KEY)
    return OpenAIChatModel(SERVED_NAME, provider=provider)


SETTINGS = {"max_tokens": 1500}  # a forced tool call may be followed by more


def test_native_output(model):
    from pydantic_ai import Agent, NativeOutput

    result = Agent(model, output_type=NativeOutput(Pet), model_settings=SETTINGS).run_sync(QUESTION)
    assert isinstance(result.output, Pet)


def test_prompted_output(model):
    from pydantic_ai import Agent, PromptedOutput

    # Any object may be long: room for it, and a seed, so the run is the same every time.
    settings = {"max_tokens": 3000, "seed": 3}
    result = Agent(model, output_type=PromptedOutput(Note), model_settings=settings).run_sync(QUESTION)
    assert isinstance(result.output, Note)


def test_tool_output_the_default_for_a_model(model):
    from pydantic_ai import Agent

    result = Agent(model, output_type=Pet, model_settings=SETTINGS).run_sync(QUESTION)
    assert isinstance(result.output, Pet)


def test_a_tool_call_round_trip(model):
    from pydantic_ai import Agent, RunContext
    from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, ToolCallPart, ToolReturnPart

    calls = []

    def settings(ctx: RunContext) -> dict:  # the first request must call the tool, the next one answers
        first = ctx.run_step <= 1
        return {"max_tokens": 300 if first else 16, "tool_choice": "required" if first else "none"}

    agent = Agent(model, output_type=str, model_settings=settings)

    @agent.tool_plain
    def weather(city: Annotated[str, Field(max_length=10)]) -> str:
        """The weather in a city."""
        calls.append(city)
        return "sunny, 21 C"

    result = agent.run_sync("What is the weather in Paris?")
    asked, called, returned, answered = result.all_messages()  # the call, its result sent back, the answer
    assert isinstance(asked, ModelRequest) and isinstance(called, ModelResponse)
    made = [part for part in called.parts if isinstance(part, ToolCallPart)]
    assert made and all(part.tool_name == "weather" for part in made) and len(calls) == len(made)
    assert all(isinstance(city, str) and len(city) <= 10 for city in calls)
    results = [part for part in returned.parts if isinstance(part, ToolReturnPart)]
    assert [part.content for part in results] == ["sunny, 21 C"] * len(made)
    assert isinstance(answered.parts[-1], TextPart) and result.output == answered.parts[-1].content
