"""Response bodies as vLLM's OpenAI server sends them: the chat completion (whole and streamed
chunks), the usage both generation routes report, logprobs, the model list.

Whole answers are sent whole (model_dump(): every key, null where there is nothing). Stream chunks
are sent as vLLM sends them, model_dump_json(exclude_unset=True): a chunk has the keys it was built
with and no others, so the builders below (`chat_chunk`, `token_choice`, `token_delta`) set the fields
vLLM's stream generator sets for each kind of chunk, and nothing else."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, model_serializer

from service.api.tool_parser import DeltaToolCall, ToolCall


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def count(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AnswerUsage(Usage):
    """A whole answer's usage, as vLLM dumps it: with its prompt_tokens_details (null: vLLM's
    --enable-prompt-tokens-details is off by default). A stream's usage has no such key (vLLM's
    chunks leave unset and null fields out)."""

    prompt_tokens_details: Optional[dict] = None


class _ToolCallsWhenMade(BaseModel):
    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler):
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)  # vLLM leaves the key out
        return data


class ResponseMessage(_ToolCallsWhenMade):
    role: str = "assistant"
    content: Optional[str]
    # vLLM's ChatMessage has these keys, null here as there (no refusals, audio or reasoning parser).
    refusal: Optional[str] = None
    annotations: Optional[dict] = None
    audio: Optional[dict] = None
    function_call: Optional[dict] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning: Optional[str] = None


class LogProb(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class LogProbsContent(LogProb):
    top_logprobs: list[LogProb] = Field(default_factory=list)


class ChoiceLogProbs(BaseModel):
    content: Optional[list[LogProbsContent]] = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: Optional[ChoiceLogProbs] = None
    finish_reason: str
    stop_reason: Union[int, str, None] = None
    token_ids: Optional[list[int]] = None
    routed_experts: Optional[str] = None  # vLLM's, for MoE models: null for dense ones


class ChatCompletionResponse(BaseModel):
    """vLLM's ChatCompletionResponse, key for key as its model_dump() sends it (the fields this
    server has nothing for are null there too)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    service_tier: Optional[str] = None
    system_fingerprint: Optional[str] = None
    usage: AnswerUsage
    prompt_logprobs: Optional[list] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_text: Optional[str] = None
    kv_transfer_params: Optional[dict] = None
    ec_transfer_params: Optional[dict] = None
    metrics: Optional[dict] = None


class Delta(_ToolCallsWhenMade):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)


def token_delta(content: Optional[str], tool_calls: list[DeltaToolCall] = ()) -> Delta:
    """A token chunk's delta as vLLM's (with its `hermes` tool parser, which the 16gb profile runs)
    makes it: the content when there is some, the tool calls when there are any; neither: {}."""
    fields = {"content": content} if content else {}
    return Delta(**fields, tool_calls=list(tool_calls)) if tool_calls else Delta(**fields)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: Optional[ChoiceLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    token_ids: Optional[list[int]] = None


def token_choice(index: int, delta: Delta, logprobs: Optional[ChoiceLogProbs], token_ids: Optional[list[int]],
                 finish_reason: Optional[str] = None, stop_reason: Union[int, str, None] = None) -> ChunkChoice:
    """vLLM's choice of a token chunk: logprobs, finish_reason and token_ids (null unless asked for),
    and stop_reason on the finishing one only."""
    if finish_reason is None:
        return ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=None, token_ids=token_ids)
    return ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                       stop_reason=stop_reason, token_ids=token_ids)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None  # on the last chunk only (vLLM's)
    prompt_token_ids: Optional[list[int]] = None
    prompt_text: Optional[str] = None


def chat_chunk(id: str, created: int, model: str, choices: list[ChunkChoice], **fields) -> ChatCompletionChunk:
    """A chunk with the keys every chunk of vLLM's has, and `fields` (usage, system_fingerprint,
    prompt_token_ids, prompt_text: the chunks of vLLM's that set them), each even when null."""
    return ChatCompletionChunk(id=id, object="chat.completion.chunk", created=created, model=model, choices=choices,
                               **fields)


class ModelPermission(BaseModel):
    """vLLM's ModelPermission, the one each of its model cards lists, with its values."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: Optional[str] = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vlkit"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
