"""Function tools on the way in, as vLLM's OpenAI server takes them with `--tool-call-parser hermes`.

- The request's shapes (`ToolParam`, `NamedToolChoice`, an assistant message's `MessageToolCall`)
  and the checks vLLM makes of them (`check_tool_usage`: the same 400s for the same mistakes).
- What the chat template gets: the tools as vLLM renders them (`template_tools`) and earlier tool
  calls with their arguments as objects (`template_tool_calls`), so Qwen3-VL's own template writes
  them exactly as for the model's training: `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`.
- `tool_call_constraint`: the grammar that makes the answer tool calls in that format, whose
  arguments match each tool's parameter schema. vLLM 0.27 enforces the same (its "hermes"
  structural tag): for tool_choice "required" one or more calls, for a named tool exactly one
  call of it, for "auto" only when a tool is `strict` (free text, but every call well-formed).

The answer's side (the Hermes parser that turns `<tool_call>` blocks into tool_calls) is
tool_parser.py.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from service.engine.structured import Constraint, json_grammar_schema, schema_json
from service.errors import InvalidRequest

_NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice, None]


class MessageFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: Union[str, dict, list, None] = None


class MessageToolCall(BaseModel):
    """A tool call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: MessageFunction


def check_tool_usage(data: Any) -> Any:
    """vLLM's check of `tools` and `tool_choice` on the raw request (before the fields are
    validated, so the messages are vLLM's): InvalidRequest naming the field; a request with tools
    and no tool_choice gets "auto"."""
    if not isinstance(data, dict):
        return data
    tools = data.get("tools")
    if tools == []:
        raise InvalidRequest("`tools` must not be an empty array. Either provide at least one tool or omit the "
                             "field entirely.", param="tools")
    if "tool_choice" not in data and tools:
        data["tool_choice"] = "auto"
    choice = data.get("tool_choice")
    if choice is None or choice == "none":
        return data
    if tools is None:
        raise InvalidRequest("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if choice in ("auto", "required"):
        return data
    if not isinstance(choice, dict):
        raise InvalidRequest(f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or '
                             '"required" are supported.', param="tool_choice")
    function = choice.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"Invalid value for `function`: `{function}` in `tool_choice`! {_NAMED_USAGE}",
                             param="tool_choice.function")
    if "name" not in function:
        raise InvalidRequest(f"Expected field `name` in `function` in `tool_choice`! {_NAMED_USAGE}",
                             param="tool_choice.function.name")
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_NAMED_USAGE}",
                             param="tool_choice.function.name")
    names = [tool.get("function", {}).get("name") for tool in tools if isinstance(tool, dict)]
    if name not in names:
        raise InvalidRequest("The tool specified in `tool_choice` does not match any of the specified `tools`",
                             param="tool_choice")
    return data


def template_tools(tools: list[ToolParam]) -> list[dict]:
    """The tools as vLLM hands them to the chat template (its model_dump: declared fields only,
    `strict` only when set), so the prompt is the same on both profiles."""
    rendered = []
    for tool in tools:
        function = tool.function
        fields: dict[str, Any] = {"name": function.name, "description": function.description,
                                  "parameters": function.parameters}
        if function.strict is not None:
            fields["strict"] = function.strict
        rendered.append({"type": "function", "function": fields})
    return rendered


def template_turn(message, role: str, i: int) -> dict:
    """Message `i`, an assistant or tool message (text parts only), as vLLM hands it to the chat
    template: an assistant's text as text parts and its tool calls with object arguments; a tool
    result as one string."""
    parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else \
        [{"type": "text", "text": part.text} for part in message.content or []]
    if role == "tool":
        return {"role": role, "content": "\n".join(part["text"] for part in parts),
                "tool_call_id": message.tool_call_id}
    turn: dict = {"role": role, "content": parts}
    if message.tool_calls:
        turn["tool_calls"] = template_tool_calls(message.tool_calls, f"messages.{i}")
    return turn


def template_tool_calls(calls: list[MessageToolCall], where: str) -> list[dict]:
    """An assistant message's tool calls for the template, arguments parsed to objects (vLLM does the
    same: templates expect them so); arguments that are not JSON are a 400 naming their place."""
    rendered = []
    for j, call in enumerate(calls):
        arguments = call.function.arguments
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise InvalidRequest(f"{where}.tool_calls.{j}.function.arguments is not valid JSON: {exc}",
                                     param=f"{where}.tool_calls.{j}.function.arguments") from None
            except RecursionError:
                raise InvalidRequest(f"{where}.tool_calls.{j}.function.arguments are nested too deeply",
                                     param=f"{where}.tool_calls.{j}.function.arguments") from None
        rendered.append({"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": arguments or {}}})
    return rendered


def tool_call_constraint(tools: list[ToolParam], tool_choice: ToolChoice, parallel: bool) -> Constraint | None:
    """The grammar of an answer made of tool calls, or None when the answer is free (tool_choice
    none, or auto without a strict tool). parallel=False: one call at most (vLLM keeps only the
    first; here the model is not asked for more)."""
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, NamedToolChoice):
        chosen = [tool for tool in tools if tool.function.name == tool_choice.function.name]
        start = "start: call"
    elif tool_choice == "required":
        chosen = tools
        start = "start: call+" if parallel else "start: call"  # no separator between calls: vLLM's tag has none
    elif any(tool.function.strict for tool in tools):  # auto: text, but a call once begun is well-formed
        chosen = tools
        start = "start: TEXT (call TEXT)*" if parallel else "start: TEXT (call TEXT)?"
    else:
        return None
    lines = ["%llguidance {}", start, "TEXT: /(.|\\n)*/",
             "call: " + " | ".join(f"call_{i}" for i in range(len(chosen)))]
    for i, tool in enumerate(chosen):
        head = json.dumps(f'{{"name": "{tool.function.name}", "arguments": ')
        # The template's layout, and the compact one (vLLM's structural tag allows both).
        lines.append(f'call_{i}: <tool_call> "\\n" {head} args_{i} "}}\\n" </tool_call> '
                     f'| <tool_call> {head} args_{i} "}}" </tool_call>')
        try:
            schema = json_grammar_schema(_parameters_schema(tool.function))
        except RecursionError:
            raise InvalidRequest(f"The parameters of tool {tool.function.name!r} are nested too deeply",
                                 param="tools") from None
        lines.append(f"args_{i}: %json {schema_json(schema, 'tools')}")
    return Constraint("lark", "\n".join(lines) + "\n", source="tools")


def _parameters_schema(function: FunctionDefinition) -> Any:
    """vLLM's rule: strict=false or no parameters takes any JSON value as the arguments."""
    if function.strict is False or function.parameters is None:
        return True
    return function.parameters
