"""Tool calls in the answer: Qwen3-VL's `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks
(the Hermes format) read as vLLM's `hermes` tool parser reads them, into OpenAI's shapes.

Whole answers (`parse_tool_calls`): every block's JSON parsed; `arguments` re-serialised as a JSON
string; the text before the first block is the content (None when empty). A block that is not JSON,
or lacks a name or arguments (or is nested too deeply to read), leaves the whole answer as content,
as vLLM does.

Streams (`StreamingToolParser`): the full text so far is re-read at each delta; text before the first
`<tool_call>` goes out as content (a suffix that may be the start of one held back); each call's
first delta carries its index, id, type and name, the following ones fragments of its arguments as
generated, so that they join into the arguments text.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, model_serializer

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_BLOCKS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's form


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


def parse_tool_calls(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, tool calls) of a whole answer."""
    if CALL_START not in text:
        return text, []
    try:
        calls = []
        for closed, open_ended in _BLOCKS.findall(text):
            block = json.loads(closed or open_ended)
            calls.append(ToolCall(id=tool_call_id(), function=FunctionCall(
                name=block["name"], arguments=json.dumps(block["arguments"], ensure_ascii=False))))
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested past what json reads
        return text, []
    content = text[:text.find(CALL_START)]
    return content or None, calls


@dataclass(frozen=True)
class ToolCallAnswer:
    """How one request's tool calls are reported (vLLM's rules): named: tool_choice names the
    function (finish_reason stays "stop", OpenAI's rule); required: tool_choice "required";
    parallel: False keeps only the first call."""

    named: bool = False
    required: bool = False
    parallel: bool = True

    def message(self, text: str, finish_reason: str) -> tuple[Optional[str], list[ToolCall], str]:
        """(content, tool calls, finish_reason) of a whole answer."""
        content, calls = parse_tool_calls(text)
        if not self.parallel:
            calls = calls[:1]
        if self.named or self.required:
            content = content or ""
        elif calls and content is not None and not content.strip():
            content = None
        if self.named:
            return content, calls, finish_reason
        if (calls and not self.required) or (self.required and finish_reason == "stop"):
            finish_reason = "tool_calls"
        return content, calls, finish_reason

    def stream_delta(self, parser: "StreamingToolParser", text: str,
                     finish_reason: Optional[str]) -> tuple[Optional[str], list[DeltaToolCall], Optional[str]]:
        """(content, tool-call deltas, finish_reason) to stream, `text` being the whole answer so far."""
        content, deltas = parser.feed(text, finished=finish_reason is not None)
        if not self.parallel:
            deltas = [delta for delta in deltas if delta.index == 0]
        if finish_reason is not None and parser.called and not self.named:
            finish_reason = "tool_calls"
        return content, deltas, finish_reason


def _partial_overlap(text: str, tag: str) -> int:
    """Length of the longest start of `tag` that `text` ends with."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StreamingToolParser:
    """One streamed answer's parser: `feed` the whole text so far, get what is new to send."""

    def __init__(self) -> None:
        self._sent_content = 0
        self._names: list[str] = []
        self._sent_arguments: list[str] = []

    @property
    def called(self) -> bool:
        return bool(self._names)

    def feed(self, text: str, finished: bool = False) -> tuple[Optional[str], list[DeltaToolCall]]:
        """(new content or None, new tool-call deltas). finished: the answer is complete, so a held
        back start of `<tool_call>` that never became one is content after all."""
        start = text.find(CALL_START)
        if start < 0:
            start = len(text) if finished else len(text) - _partial_overlap(text, CALL_START)
        content = None
        if start > self._sent_content:
            content, self._sent_content = text[self._sent_content:start], start
        deltas: list[DeltaToolCall] = []
        for i, (body, complete) in enumerate(self._blocks(text)):
            if i == len(self._names):
                name = _NAME.search(body)
                if name is None:
                    break  # the next call's name is not complete yet
                self._names.append(name.group(1))
                self._sent_arguments.append("")
                deltas.append(DeltaToolCall(index=i, id=tool_call_id(), type="function",
                                            function=DeltaFunctionCall(name=name.group(1))))
            arguments = self._arguments(body, complete)
            if arguments is not None and len(arguments) > len(self._sent_arguments[i]):
                deltas.append(DeltaToolCall(index=i, function=DeltaFunctionCall(
                    arguments=arguments[len(self._sent_arguments[i]):])))
                self._sent_arguments[i] = arguments
        return content, deltas

    @staticmethod
    def _blocks(text: str) -> list[tuple[str, bool]]:
        """(JSON text, complete) of each block begun so far."""
        blocks, pos = [], 0
        while (start := text.find(CALL_START, pos)) >= 0:
            body_at = start + len(CALL_START)
            end = text.find(CALL_END, body_at)
            if end >= 0:
                blocks.append((text[body_at:end].strip(), True))
                pos = end + len(CALL_END)
                continue
            body = text[body_at:]
            body = body[:len(body) - _partial_overlap(body, CALL_END)].strip()
            blocks.append((body, _is_json(body)))
            break
        return blocks

    @staticmethod
    def _arguments(body: str, complete: bool) -> Optional[str]:
        """The arguments text of a block so far; once the block is complete, without the brace that
        closes the block's object."""
        found = _ARGUMENTS.search(body)
        if found is None:
            return None
        arguments = body[found.end():]
        if complete:
            arguments = arguments.rstrip()
            if arguments.endswith("}"):
                arguments = arguments[:-1].rstrip()
        return arguments


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return bool(text)
