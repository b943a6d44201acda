"""POST /v1/completions as vLLM's OpenAIServingCompletion: a text prompt (or its token ids), no chat
template, the same sampling surface as chat, vLLM's `text_completion` bodies and stream chunks."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional, Union

import orjson
from pydantic import Field, model_validator
from starlette.responses import JSONResponse, Response

from service.api.cancellation import GenerationResponse
from service.api.error_handlers import count_error
from service.api.logprobs import completion_logprobs
from service.api.offload import off_loop
from service.api.protocol import SamplingFields, Usage, validate
from service.api.serving import ChoiceText, gather, in_intervals, usage_of
from service.api.structured_outputs import ResponseFormat, StructuredOutputs, check_response_format, structured_constraint
from service.api.sse import DONE, EventStreamResponse, sse_error
from service.engine import Engine, RequestHandle
from service.engine.sampling import MAX_LOGPROBS
from service.errors import InvalidRequest
from service.metrics import ServiceMetrics


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # vLLM's default for completions
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True
    response_format: Optional[ResponseFormat] = None  # structured outputs, as on chat
    structured_outputs: Optional[StructuredOutputs] = None

    @model_validator(mode="before")
    @classmethod
    def _format_rules(cls, data: Any) -> Any:
        return check_response_format(data)

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise InvalidRequest("This server takes one prompt per completion request.", param="prompt")
            self.prompt = self.prompt[0]
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs needs prompt logprobs, which this server does not compute.",
                                 param="echo")
        return self

    def to_engine_options(self) -> dict:
        return self.sampling_options(self.max_tokens, self.logprobs)


def _choice(index: int, text: str, logprobs: Any, finish_reason: Optional[str], stop_reason: Any,
            token_ids: Optional[list[int]]) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


class CompletionServing:
    def __init__(self, chat_serving, metrics: ServiceMetrics):
        self.chat = chat_serving  # the model check
        self.metrics = metrics

    async def create_completion(self, body: bytes, engine: Engine, arrived: float) -> GenerationResponse:
        request_body = validate(CompletionRequest, body)
        self.chat.check_model(request_body.model)
        options = request_body.to_engine_options()
        constraint = structured_constraint(request_body.response_format, request_body.structured_outputs)
        options["grammar"] = await off_loop(engine.compile_grammar, constraint) if constraint is not None else None
        prompt = request_body.prompt
        if isinstance(prompt, str):
            request = await off_loop(engine.prepare_text, prompt,
                                              add_special_tokens=request_body.add_special_tokens, **options)
        else:
            request = await off_loop(engine.prepare_tokens, list(prompt), **options)
        request.id = f"cmpl-{request_body.request_id}" if request_body.request_id else "cmpl-" + request.id[9:]
        echo = "" if not request_body.echo else prompt if isinstance(prompt, str) else \
            engine.tokenizer.decode(list(prompt))
        model = self.chat.settings.model_name
        tokenizer, as_ids = engine.tokenizer, bool(request_body.return_tokens_as_token_ids)
        with_ids = bool(request_body.return_token_ids)
        n = request.params.n

        async def whole(handle: RequestHandle) -> dict:
            choices: list[ChoiceText] = await gather(handle, n)
            out = []
            for index, c in enumerate(choices):
                logprobs = None if c.logprobs is None else completion_logprobs(c.logprobs, tokenizer, as_ids)
                out.append(_choice(index, echo + "".join(c.text), logprobs, c.last.finish_reason, c.last.stop_reason,
                                   c.token_ids if with_ids else None))
            body = {"id": request.id, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": out, "usage": usage_of(choices).model_dump()}
            if with_ids:
                body["prompt_token_ids"] = request.prompt.input_ids.tolist()
            return body

        async def stream(handle: RequestHandle) -> AsyncIterator[bytes]:
            created = int(time.time())

            def chunk(choices: list[dict], usage: Usage | None = None) -> bytes:
                body = {"id": request.id, "object": "text_completion", "created": created, "model": model,
                        "choices": choices}
                if usage is not None:
                    body["usage"] = usage.model_dump()
                return b"data: " + orjson.dumps(body) + b"\n\n"

            if echo:
                for index in range(n):
                    yield chunk([_choice(index, echo, None, None, None, None)])
            offsets, completed, prompt_tokens = [len(echo)] * n, {}, 0
            async for event in in_intervals(handle.__aiter__(), request_body.stream_interval):
                if event.error is not None:
                    count_error(self.metrics, event.error)
                    yield sse_error(event.error)
                    break
                prompt_tokens = event.prompt_tokens or prompt_tokens
                if not (event.text or event.finish_reason or event.logprobs):
                    continue
                logprobs = None if event.logprobs is None else \
                    completion_logprobs(event.logprobs, tokenizer, as_ids, offsets[event.index])
                offsets[event.index] += len(event.text)
                yield chunk([_choice(event.index, event.text, logprobs, event.finish_reason, event.stop_reason,
                                     event.token_ids if with_ids else None)])
                if event.finish_reason is not None:
                    completed[event.index] = event.completion_tokens
            if request_body.include_usage and len(completed) == n:
                yield chunk([], Usage.count(prompt_tokens, sum(completed.values())))
            yield DONE

        async def respond(handle: RequestHandle) -> Response:
            if request_body.stream:
                return EventStreamResponse(stream(handle))
            return JSONResponse(await whole(handle))

        return GenerationResponse(engine, request, arrived, respond)
