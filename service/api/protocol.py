"""Request bodies of the OpenAI chat completions API as vLLM's server takes them, and what both
generation routes share (strict JSON, the sampling fields). The bodies sent back are responses.py.

A request converts itself: `parse` (body bytes -> a validated request: strict JSON, vLLM's field
rules, the refused fields by name: service/api/fields.py), `chat_messages` (the chat template's
messages and the image URLs), `to_engine_options` (Engine.prepare's keyword arguments) and
`answer_constraint` (the grammar the answer follows: structured outputs or tool calls). Each rule
lives in one of them; those of tools are in tools.py, those of structured outputs in
structured_outputs.py.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.api.fields import check_refused
from service.api.structured_outputs import (
    ResponseFormat,
    StructuredOutputs,
    check_response_format,
    structured_constraint,
)
from service.api.tool_parser import ToolCallAnswer
from service.api.tools import (
    MessageToolCall,
    NamedToolChoice,
    ToolChoice,
    ToolParam,
    check_tool_usage,
    template_tools,
    template_turn,
    tool_call_constraint,
)
from service.engine.stops import RepetitionDetectionParams
from service.engine.structured import Constraint
from service.errors import InvalidBody, InvalidRequest

INT64_MAX = 2**63 - 1  # vLLM's bound of truncate_prompt_tokens

def parse_json(body: bytes) -> Any:
    """Strict JSON (orjson: RFC 8259): no NaN or Infinity, no lone surrogates, valid UTF-8, at most
    1024 levels deep; anything else is the request's 400."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # vLLM's param: where it stopped, "body.<char>"
        raise InvalidBody(f"The request body is not valid JSON: {exc}", param=f"body.{exc.pos}") from None


def check_integer(data: dict, name: str) -> None:
    """vLLM's check_logprobs: a logprobs count that is not a number is a 400 (not pydantic's)."""
    value = data.get(name)
    if value is not None and not isinstance(value, (int, float)):
        raise InvalidRequest(f"`{name}` must be an integer.", param=name, value=value)


def check_prompt_logprobs(data: dict) -> None:
    """vLLM's check_logprobs on prompt_logprobs (both routes): -1 or at least 0, and none in a
    stream beyond the tokens' own (0)."""
    prompt_logprobs = data.get("prompt_logprobs")
    if prompt_logprobs is None:
        return
    if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
        raise InvalidRequest("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
    if prompt_logprobs < 0 and prompt_logprobs != -1:
        raise InvalidRequest("`prompt_logprobs` must be a positive value or -1.", param="prompt_logprobs",
                             value=prompt_logprobs)


def check_logprob_token_ids_beam(data: dict) -> None:
    """vLLM's first rule of logprob_token_ids on either route (before beam search is refused by name)."""
    if data.get("logprob_token_ids") and data.get("use_beam_search"):
        raise InvalidRequest("`logprob_token_ids` is not supported with beam search.", param="logprob_token_ids")


def validate(model: type[BaseModel], body: bytes | dict) -> Any:
    """``model`` from a request body (or its parsed JSON); InvalidBody (400) naming the first field
    that does not validate, or InvalidRequest from the model's own rules (vLLM's, raised as vLLM
    raises its VLLMValidationError)."""
    payload = parse_json(body) if isinstance(body, (bytes, bytearray)) else body
    if not isinstance(payload, dict):
        raise InvalidBody("The request body must be a JSON object.", param="body")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except InvalidRequest:
        raise
    except (ValueError, TypeError, RecursionError) as exc:  # a validator's own refusal
        raise InvalidBody(str(exc), param="body") from None


def _validation_error(exc: ValidationError) -> InvalidBody:
    """The most specific of pydantic's errors (a union reports one per branch), with a readable path:
    the message names it as in the body ("messages.0.content: ..."), `param` as vLLM's does ("body.")."""
    errors = sorted(exc.errors(), key=lambda e: len(e["loc"]), reverse=True)
    first = errors[0]
    # Drop union-branch labels such as "str" or "list[tagged-union[...]]" from the path, and a content
    # part's `type` tag (pydantic puts it before the part's own fields: "0.text.text", "0.image_url.image_url").
    loc = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p == "str"))]
    loc = [p for i, p in enumerate(loc) if not (0 < i < len(loc) - 1 and isinstance(loc[i - 1], int)
                                                and isinstance(p, str) and loc[i + 1] == p)]
    where = ".".join(str(p) for p in loc)
    return InvalidBody(f"{where}: {first['msg']}" if where else first["msg"], param=".".join(["body", *map(str, loc)]))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


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


# Parts vLLM's chat parser reads as text, and the field that holds it.
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal", "thinking": "thinking"}


def _canonical_part(part: object) -> object:
    """The content-part shapes vLLM's chat parser takes besides the two canonical ones, as those
    (None: a part vLLM skips): a bare string, ``input_text`` / ``output_text`` / ``refusal`` /
    ``thinking`` (text; a refusal or thinking without its text is skipped), ``input_image`` (the
    Responses API's, ``image_url`` a string; vLLM also wants its ``detail``, here optional) and a part
    without ``type`` that has an ``image_url``."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind is None:
        if part.get("image_url") is None:
            raise ValueError("Missing 'type' field in multimodal part.")
        return {**part, "type": "image_url"}
    if kind in _TEXT_PARTS:
        text = part.get(_TEXT_PARTS[kind])
        if text is None and kind in ("refusal", "thinking"):
            return None
        return {"type": "text", "text": text}
    if kind == "input_image":
        return {"type": "image_url", "image_url": part.get("image_url")}
    return part


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name ...: accepted, not used

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[MessageToolCall]] = None  # assistant: the calls it made
    tool_call_id: Optional[str] = None  # tool: the call this is the result of

    @field_validator("content", mode="before")
    @classmethod
    def _canonical_parts(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        return [p for p in (_canonical_part(part) for part in v) if p is not None]


def template_messages(messages: list[Message]) -> tuple[list[dict], list[str]]:
    """The chat template's messages (images as {"type": "image"} parts) and the image URLs in prompt order."""
    rendered: list[dict] = []
    urls: list[str] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content if isinstance(message.content, list) else []
        images = any(part.type != "text" for part in content)
        if images and role not in ("user", "tool"):  # Qwen3-VL's template drops them elsewhere
            raise InvalidRequest(f"Images are accepted in user and tool messages only (message {i} is {role!r}).",
                                 param=f"messages.{i}.content", kind="unsupported")
        if role == "assistant" or role == "tool" and not images:
            rendered.append(template_turn(message, role, i))
            continue
        if message.content is None or isinstance(message.content, str):
            rendered.append({"role": role, "content": message.content or ""})
            continue
        parts: list[dict] = []
        for part in content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image"})
                urls.append(part.image_url.url)
        # A tool result with images (a screenshot agent's): its parts, as the template renders them.
        rendered.append({"role": role, "content": parts, **({"tool_call_id": message.tool_call_id} if role == "tool" else {})})
    return rendered, urls


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class SamplingFields(BaseModel):
    """The sampling fields vLLM's chat and completion requests share, with vLLM's request-level
    rules. Their ranges are checked once, where vLLM checks them: the engine's SamplingParams (with
    vLLM's messages), as the request is prepared."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does; refused ones: check_refused

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # vLLM extension; -1 or 0: off
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    n: Optional[int] = 1
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: Optional[list[int]] = None
    bad_words: list[str] = Field(default_factory=list)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    request_id: Optional[str] = Field(None, max_length=256)
    return_tokens_as_token_ids: Optional[bool] = None
    return_token_ids: Optional[bool] = None
    cache_salt: Optional[str] = None
    stream_interval: Optional[int] = Field(None, ge=1)
    prompt_logprobs: Optional[int] = None  # -1: the whole vocabulary (over --max-logprobs: refused, as on vLLM)
    truncate_prompt_tokens: Optional[Annotated[int, Field(ge=-1, le=INT64_MAX)]] = None
    truncation_side: Optional[Literal["left", "right"]] = None
    logprob_token_ids: Optional[list[int]] = None
    repetition_detection: Optional[RepetitionDetectionParams] = None  # its rules: the dataclass's, as vLLM's

    @model_validator(mode="before")
    @classmethod
    def _vllm_rules(cls, data: Any) -> Any:
        """vLLM's request-level rules (validate_stream_options, check_cache_salt_support) and the
        refused fields by name."""
        if isinstance(data, dict):
            if data.get("stream_options") and not data.get("stream"):
                raise InvalidRequest("Stream options can only be defined when `stream=True`.", param="stream_options")
            salt = data.get("cache_salt")
            if salt is not None and (not isinstance(salt, str) or not salt):
                raise InvalidRequest("Parameter 'cache_salt' must be a non-empty string if provided.",
                                     param="cache_salt")
            check_refused(data)
        return data

    @classmethod
    def parse(cls, body: bytes):
        """The request in `body`; InvalidRequest (400) for JSON that does not parse or fields that do not validate."""
        return validate(cls, body)

    def logit_bias_ids(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        invalid = [token for token in self.logit_bias if not _is_int(token)]
        if invalid:
            raise InvalidRequest(f"logit_bias contains key(s) that cannot be converted to integer token IDs: "
                                 f"{invalid!r}", param="logit_bias", value=invalid)
        return {int(token): bias for token, bias in self.logit_bias.items()}

    def sampling_options(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> dict:
        """Engine.prepare's sampling keyword arguments; None leaves the model's generation_config default."""
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0 if self.top_k == -1 else self.top_k,  # vLLM quietly takes -1 for 0 (off)
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias_ids(),
            "seed": None if self.seed == -1 else self.seed,  # vLLM: -1 is no seed
            "n": self.n,
            "stop": stop,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "allowed_token_ids": None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            "bad_words": tuple(self.bad_words),
            "logprobs": None if self.logprob_token_ids else logprobs,  # vLLM: the ids take the top ones' place
            "logprob_token_ids": tuple(self.logprob_token_ids) if self.logprob_token_ids else None,
            "prompt_logprobs": prompt_logprobs,
            "repetition_detection": self.repetition_detection,
            "cache_salt": self.cache_salt,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "truncation_side": self.truncation_side,
        }

    @property
    def include_usage(self) -> bool:
        """A streamed answer ends with a chunk carrying the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every streamed chunk carries the usage so far (vLLM: with include_usage)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = 0
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    mm_processor_kwargs: Optional[dict[str, Any]] = None  # min_pixels / max_pixels within the server's
    return_prompt_text: Optional[bool] = None
    # Structured outputs and tools (structured_outputs.py, tools.py).
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    tools: Optional[list[ToolParam]] = None
    tool_choice: ToolChoice = "none"
    parallel_tool_calls: Optional[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _tool_and_format_rules(cls, data: Any) -> Any:
        """vLLM's check_tool_usage and validate_response_format."""
        return check_response_format(check_tool_usage(data))

    @model_validator(mode="before")
    @classmethod
    def _chat_rules(cls, data: Any) -> Any:
        """vLLM's check_logprobs (check_generation_prompt is the engine's: PromptBuilder.render)."""
        if isinstance(data, dict):
            check_logprob_token_ids_beam(data)
            if data.get("logprob_token_ids") and not data.get("logprobs"):
                raise InvalidRequest("when using `logprob_token_ids`, `logprobs` must be set to true.",
                                     param="logprob_token_ids")
            check_integer(data, "prompt_logprobs")
            top = data.get("top_logprobs")
            if top is not None and not isinstance(top, int):
                raise InvalidRequest("`top_logprobs` must be an integer.", param="top_logprobs", value=top)
            check_prompt_logprobs(data)
            if top is not None and top < 0 and top != -1:
                raise InvalidRequest("`top_logprobs` must be a positive value or -1.", param="top_logprobs", value=top)
            if top is not None and (top == -1 or top > 0) and not data.get("logprobs"):
                raise InvalidRequest("when using `top_logprobs`, `logprobs` must be set to true.",
                                     param="top_logprobs")
        return data

    def chat_messages(self) -> tuple[list[dict], list[str]]:
        """The chat template's messages and the image URLs (`template_messages`)."""
        return template_messages(self.messages)

    def to_engine_options(self) -> dict:
        """Engine.prepare's keyword arguments: the sampling fields and the prompt's."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        # vLLM's: echo asks for the prompt's logprobs, top_logprobs of them (0 unless set: each token's
        # own), shown in a whole answer's prompt_logprobs.
        prompt_logprobs = self.prompt_logprobs if self.prompt_logprobs is not None else \
            self.top_logprobs if self.echo else None
        return {**self.sampling_options(max_tokens, self.top_logprobs or 0 if self.logprobs else None, prompt_logprobs),
                "chat_template_kwargs": self.chat_template_kwargs,
                "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "add_special_tokens": self.add_special_tokens,
                "mm_processor_kwargs": self.mm_processor_kwargs,
                "tools": self.template_tools()}

    def answer_constraint(self) -> Constraint | None:
        """The grammar the answer must follow: the tool calls tool_choice demands (they take the place
        of response_format and structured_outputs, as on vLLM), else the structured output asked
        for, else None. InvalidRequest for the combinations vLLM refuses."""
        structured = structured_constraint(self.response_format, self.structured_outputs)
        if isinstance(self.tool_choice, NamedToolChoice) and self.structured_outputs is not None \
                and structured is not None and structured.kind in ("json", "regex", "choice"):
            raise InvalidRequest("You can only either use constraints for structured outputs or tools, not both.")
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
    def response_role(self) -> str:
        """vLLM's get_chat_request_role: the assistant, or the last message's role when it is continued."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role

    def echoed(self) -> str:
        """vLLM's echo: the last message's text (its parts joined by newlines, as vLLM joins them),
        when it is of the role the answer continues."""
        if not self.echo or self.messages[-1].role != self.response_role:
            return ""
        content = self.messages[-1].content
        if content is None or isinstance(content, str):
            return content or ""
        return "\n".join(part.text for part in content if part.type == "text")
