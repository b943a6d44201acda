"""Request and response bodies of the OpenAI chat completions API, as vLLM's server speaks it.

A request converts itself: `parse` (body bytes -> a validated request), `check_supported` (the fields
accepted only at their neutral values), `chat_messages` (the chat template's messages and the image
URLs) and `to_sampling_fields` (Engine.prepare's keyword arguments). Each rule lives in one of them.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ...: accepted, not used

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


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
    tools: Optional[list] = None
    response_format: Optional[dict] = None

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
        if self.tools:
            raise InvalidRequest("tools are not supported by this server.", param="tools", kind="unsupported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequest("Only response_format type 'text' is supported.", param="response_format",
                                 kind="unsupported")

    def chat_messages(self) -> tuple[list[dict], list[str]]:
        """The chat template's messages (images as {"type": "image"} parts) and the image URLs in prompt order."""
        messages: list[dict] = []
        urls: list[str] = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
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

    @property
    def include_usage(self) -> bool:
        """A streamed answer ends with a chunk carrying the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)


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
    content: str


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
