"""Request and response bodies of the OpenAI chat completions API, as vLLM's server speaks it.

A request converts itself: `parse` (body bytes -> a validated request), `check_supported` (the fields
accepted only at their neutral values), `chat_messages` (the chat template's messages and the image
URLs), `to_sampling_fields` (Engine.prepare's keyword arguments) and `answer_constraint` (the grammar
the answer follows: structured outputs or tool calls). Each rule lives in one of them; the rules of
tools are in tools.py, those of structured outputs in structured_outputs.py.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from service.api.structured_outputs import (
    ResponseFormat,
    StructuredOutputs,
    check_response_format,
    structured_constraint,
)
from service.api.tool_parser import DeltaToolCall, ToolCall, ToolCallAnswer
from service.api.tools import (
    MessageToolCall,
    NamedToolChoice,
    ToolChoice,
    ToolParam,
    check_tool_usage,
    template_tool_calls,
    template_tools,
    tool_call_constraint,
)
from service.engine.structured import Constraint
from service.errors import InvalidRequest


class ImageURL(BaseModel):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v: object) -> object:
        return {"url": v} if isinstance(v, str) else v  # vLLM accepts a bare string too


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name ...: accepted, not used

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[MessageToolCall]] = None  # assistant: the calls it made
    tool_call_id: Optional[str] = None  # tool: the call this is the result of


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does

    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM extension; -1 or 0: off
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    ignore_eos: bool = False  # vLLM extension
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Accepted only at their neutral values (anything else is refused with 400, not silently ignored).
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logprobs: Optional[bool] = False
    # Structured outputs and tools (structured_outputs.py, tools.py).
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    tools: Optional[list[ToolParam]] = None
    tool_choice: ToolChoice = "none"
    parallel_tool_calls: Optional[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _vllm_checks(cls, data):
        return check_response_format(check_tool_usage(data))

    @classmethod
    def parse(cls, body: bytes) -> "ChatCompletionRequest":
        """The request in `body`; InvalidRequest (400) for JSON that does not parse or fields that do not validate."""
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}", kind="malformed") from None
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def check_supported(self) -> None:
        """InvalidRequest naming the first field this server does not honour (never a silent 200)."""
        if self.n != 1:
            raise InvalidRequest("Only n=1 is supported: one choice per request.", param="n", kind="unsupported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported by this server.", param=name, kind="unsupported")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported by this server.", param="logprobs", kind="unsupported")

    def chat_messages(self) -> tuple[list[dict], list[str]]:
        """The chat template's messages (images as {"type": "image"} parts) and the image URLs in prompt order."""
        messages: list[dict] = []
        urls: list[str] = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            if role == "assistant" or role == "tool":
                messages.append(_tool_turn(message, role, i))
                continue
            if message.content is None or isinstance(message.content, str):
                messages.append({"role": role, "content": message.content or ""})
                continue
            parts: list[dict] = []
            for part in message.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                elif role != "user":
                    raise InvalidRequest(f"Images are accepted in user messages only (message {i} is {role!r}).",
                                         param=f"messages.{i}.content", kind="unsupported")
                else:
                    parts.append({"type": "image"})
                    urls.append(part.image_url.url)
            messages.append({"role": role, "content": parts})
        return messages, urls

    def to_sampling_fields(self) -> dict:
        """Engine.prepare's sampling keyword arguments; None leaves the model's generation_config default."""
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return {
            "max_tokens": self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None if self.top_k is None else max(self.top_k, 0),  # vLLM's -1 and 0 both mean off
            "seed": self.seed,
            "stop": stop,
            "ignore_eos": self.ignore_eos,
        }

    def answer_constraint(self) -> Constraint | None:
        """The grammar the answer must follow: the tool calls tool_choice demands (they take the place
        of response_format and structured_outputs, as on vLLM), else the structured output asked
        for, else None. InvalidRequest for the combinations vLLM refuses."""
        structured = structured_constraint(self.response_format, self.structured_outputs)
        if isinstance(self.tool_choice, NamedToolChoice) and self.structured_outputs is not None \
                and structured is not None and structured.kind in ("json", "regex", "choice"):
            raise InvalidRequest("You can only either use constraints for structured outputs or tools, not both.",
                                 param="structured_outputs")
        if self.tools:
            tools = tool_call_constraint(self.tools, self.tool_choice, self.parallel_tool_calls is not False)
            if tools is not None:
                return tools
        return structured

    def tool_call_answer(self) -> ToolCallAnswer | None:
        """How the answer's tool calls are read (None: not at all, with no tools or tool_choice none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return ToolCallAnswer(named=isinstance(self.tool_choice, NamedToolChoice),
                              required=self.tool_choice == "required", parallel=self.parallel_tool_calls is not False)

    def template_tools(self) -> list[dict] | None:
        """The tools for the chat template (rendered with tool_choice none too, as vLLM does)."""
        return template_tools(self.tools) if self.tools else None

    @property
    def include_usage(self) -> bool:
        """A streamed answer ends with a chunk carrying the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)


def _tool_turn(message: Message, role: str, i: int) -> dict:
    """An assistant or tool message as vLLM hands it to the chat template: an assistant's text as
    text parts and its tool calls with object arguments; a tool result as one string."""
    parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else []
    for part in message.content if isinstance(message.content, list) else []:
        if part.type != "text":
            raise InvalidRequest(f"Images are accepted in user messages only (message {i} is {role!r}).",
                                 param=f"messages.{i}.content", kind="unsupported")
        parts.append({"type": "text", "text": part.text})
    if role == "tool":
        return {"role": role, "content": "\n".join(part["text"] for part in parts),
                "tool_call_id": message.tool_call_id}
    turn: dict = {"role": role, "content": parts}
    if message.tool_calls:
        turn["tool_calls"] = template_tool_calls(message.tool_calls, f"messages.{i}")
    return turn


def _validation_error(exc: ValidationError) -> InvalidRequest:
    """The most specific of pydantic's errors (a union reports one per branch), with a readable path."""
    errors = sorted(exc.errors(), key=lambda e: len(e["loc"]), reverse=True)
    first = errors[0]
    # Drop union-branch labels such as "str" or "list[tagged-union[...]]" from the path.
    where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p == "str")))
    return InvalidRequest(f"{where}: {first['msg']}", param=where or None, kind="malformed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def count(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: list[ToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler):
        data = handler(self)
        if not data["tool_calls"]:
            del data["tool_calls"]  # vLLM leaves the key out
        return data


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler):
        data = handler(self)
        if not data["tool_calls"]:
            del data["tool_calls"]
        return data


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vlkit"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
