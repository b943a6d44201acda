"""POST /tokenize and /detokenize in vLLM's shapes (vllm/entrypoints/serve/tokenize): a text prompt,
or chat messages through the chat template (images included), to token ids; token ids to text."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.offload import off_loop
from service.api.fields import check_refused
from service.api.protocol import Message, parse_json, template_messages, validate
from service.api.tools import ToolParam, template_tools
from service.engine import Engine
from service.errors import InvalidRequest


class _Strict(BaseModel):
    """vLLM's fields we do not honour are refused by name, as on the generation routes."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_refused(data)
        return data


class TokenizeCompletionRequest(_Strict):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: Optional[bool] = False


class TokenizeChatRequest(_Strict):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: Optional[bool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    mm_processor_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[ToolParam]] = None  # rendered as for a chat request


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]


class Tokenization:
    def __init__(self, chat_serving):
        self.chat = chat_serving  # the model check, the image loader, the chat conversion

    async def tokenize(self, body: bytes, engine: Engine) -> dict:
        payload = parse_json(body)
        chat = isinstance(payload, dict) and "messages" in payload
        request = validate(TokenizeChatRequest if chat else TokenizeCompletionRequest, payload)
        self.chat.check_model(request.model)
        if chat:
            messages, urls = template_messages(request.messages)
            engine.check_image_count(len(urls))
            images = await self.chat.images.load(urls)
            prompt = await off_loop(
                engine.prompts.build, messages, images, chat_template_kwargs=request.chat_template_kwargs,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                add_special_tokens=request.add_special_tokens, mm_processor_kwargs=request.mm_processor_kwargs,
                tools=template_tools(request.tools) if request.tools else None)
        else:
            prompt = await off_loop(engine.prompts.build_text, request.prompt, [],
                                             add_special_tokens=request.add_special_tokens)
        tokens = prompt.input_ids.tolist()
        answer = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens, "token_strs": None}
        if request.return_token_strs:
            answer["token_strs"] = engine.tokenizer.convert_ids_to_tokens(tokens)
        return answer

    async def detokenize(self, body: bytes, engine: Engine) -> dict:
        request = validate(DetokenizeRequest, body)
        self.chat.check_model(request.model)
        vocab = engine.prompts.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise InvalidRequest(f"token ids must be in [0, {vocab})", param="tokens")
        if len(request.tokens) > engine.max_model_len * 64:  # bounded work; a context's worth and more
            raise InvalidRequest("too many tokens to detokenize in one request", param="tokens")
        return {"prompt": await off_loop(engine.tokenizer.decode, request.tokens)}
