"""POST /v1/completions as vLLM's OpenAIServingCompletion: a text prompt (or its token ids), or a list
of them, no chat template, the same sampling surface as chat, vLLM's `text_completion` bodies and
stream chunks."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, AsyncIterator, Optional, Union

import orjson
from pydantic import model_validator
from starlette.responses import JSONResponse, Response

from service.api.cancellation import GenerationResponse
from service.api.logprobs import Echoed, completion_logprobs, prompt_logprobs_body, prompt_positions
from service.api.offload import off_loop
from service.api.protocol import SamplingFields, check_integer, check_logprob_token_ids_beam, check_prompt_logprobs
from service.api.responses import AnswerUsage, Usage
from service.api.serving import (AnswerShape, StreamUsage, gather, long_logprobs, response_id, stream_answer,
                                 usage_of)
from service.api.sse import EventStreamResponse
from service.api.structured_outputs import ResponseFormat, StructuredOutputs, check_response_format, structured_constraint
from service.engine import Engine, Event, RequestHandle
from service.errors import InvalidRequest
from service.metrics import ServiceMetrics


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = 16  # vLLM's default for completions (null too)
    echo: Optional[bool] = False
    logprobs: Optional[int] = None  # its maximum: the engine's SamplingParams checks it, as vLLM's does
    add_special_tokens: bool = True
    response_format: Optional[ResponseFormat] = None  # structured outputs, as on chat
    structured_outputs: Optional[StructuredOutputs] = None

    @model_validator(mode="before")
    @classmethod
    def _completion_rules(cls, data: Any) -> Any:
        """vLLM's validate_response_format, validate_prompt_and_prompt_embeds, check_logprobs (what is
        not refused by name) and normalize_null_max_tokens (null is the default)."""
        if not isinstance(data, dict):
            return data
        if data.get("prompt") in (None, ""):
            raise InvalidRequest("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        check_logprob_token_ids_beam(data)
        if data.get("logprob_token_ids") and data.get("echo") and data.get("max_tokens") == 0:
            raise InvalidRequest("`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because no "
                                 "output tokens are generated.", param="logprob_token_ids")
        if data.get("logprob_token_ids") and data.get("logprobs") is None:
            raise InvalidRequest("when using `logprob_token_ids`, `logprobs` must be set.", param="logprob_token_ids")
        for name in ("prompt_logprobs", "logprobs"):
            check_integer(data, name)
        check_prompt_logprobs(data)
        logprobs = data.get("logprobs")
        if logprobs is not None and logprobs < 0:
            raise InvalidRequest("`logprobs` must be a positive value.", param="logprobs", value=logprobs)
        if "max_tokens" in data and data["max_tokens"] is None:
            data = {key: value for key, value in data.items() if key != "max_tokens"}
        return check_response_format(data)

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts, each a text or its token ids: a list of several (LangChain's OpenAI LLM sends
        its batch so) is answered as vLLM answers it, one engine request each."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @model_validator(mode="after")
    def _checks(self) -> "CompletionRequest":
        if len(self.prompts) > 1 and self.stream:
            raise InvalidRequest("stream with several prompts is not supported here: stream one prompt per "
                                 "request, or leave stream off for the list", param="stream")
        return self

    @property
    def echo_only(self) -> bool:
        """vLLM's echo without generation: echo with max_tokens 0 answers with the prompt alone (it
        samples one token, counted in the usage, and does not show it)."""
        return bool(self.echo) and self.max_tokens == 0

    def to_engine_options(self) -> dict:
        # vLLM's: echo with logprobs asks for the prompt's logprobs, that many top ones, to echo them.
        prompt_logprobs = self.prompt_logprobs if self.prompt_logprobs is not None else \
            self.logprobs if self.echo else None
        return self.sampling_options(1 if self.echo_only else self.max_tokens, self.logprobs, prompt_logprobs)


def _choice(index: int, text: str, logprobs: Any = None, finish_reason: Optional[str] = None, stop_reason: Any = None,
            token_ids: Optional[list[int]] = None, prompt_token_ids: Optional[list[int]] = None) -> dict:
    """vLLM's CompletionResponseStreamChoice, key for key (the token ids null unless asked for)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, "prompt_token_ids": prompt_token_ids, "token_ids": token_ids}


class CompletionServing:
    def __init__(self, chat_serving, metrics: ServiceMetrics):
        self.chat = chat_serving  # the model check
        self.metrics = metrics

    async def create_completion(self, body: CompletionRequest, engine: Engine, arrived: float) -> GenerationResponse:
        self.chat.check_model(body.model)
        prompts, max_queue = body.prompts, self.chat.settings.max_queue
        if len(prompts) > max_queue:  # each prompt is a queued request
            raise InvalidRequest(f"{len(prompts)} prompts in one request, more than this server queues "
                                 f"({max_queue}); send at most {max_queue}", param="prompt")
        engine.check_queue_room(len(prompts))  # a full queue's 429 before the grammar and the prompts' preparation
        options = body.to_engine_options()
        constraint = structured_constraint(body.response_format, body.structured_outputs)
        options["grammar"] = await off_loop(engine.compile_grammar, constraint) if constraint is not None else None
        answer_id = response_id("cmpl", body.request_id)
        requests, shapes = [], []
        for prompt in prompts:
            if isinstance(prompt, str):
                request = await off_loop(engine.prepare_text, prompt, add_special_tokens=body.add_special_tokens,
                                         **options)
            else:
                request = await off_loop(engine.prepare_tokens, list(prompt), **options)
            request.id = answer_id
            # vLLM's echo: the prompt's text, but none with return_token_ids (the prompt comes as its
            # prompt_token_ids then: vLLM does not detokenize it).
            echo = "" if not body.echo or body.return_token_ids else \
                prompt if isinstance(prompt, str) else engine.tokenizer.decode(list(prompt))
            requests.append(request)
            shapes.append(AnswerShape.of(body, request, engine, echo=echo, echo_only=body.echo_only,
                                         echo_logprobs=body.logprobs if body.echo else None))
        model = self.chat.settings.model_name

        async def respond(handles: list[RequestHandle]) -> Response:
            if body.stream:  # one prompt (the request's checks)
                return EventStreamResponse(stream(handles[0], answer_id, model, body.include_usage, self.metrics,
                                                  shapes[0]))
            return JSONResponse(await whole(handles, answer_id, model, shapes))

        return GenerationResponse(engine, requests, arrived, respond)


def stream(handle: RequestHandle, request_id: str, model: str, include_usage: bool, metrics: ServiceMetrics,
           shape: AnswerShape) -> AsyncIterator[bytes]:
    """vLLM's completion chunks: each choice's text as it comes, its first chunk with the echo (the
    prompt's text and, with logprobs, the prompt's logprobs before its tokens') and the prompt's
    token ids (when asked), then stream_answer's usage and [DONE]."""
    created = int(time.time())
    offsets = [0] * shape.n  # vLLM's: each choice's text so far, the echo not counted
    token_texts = [shape.token_texts() for _ in range(shape.n)]  # each choice's, across its chunks
    announced: set[int] = set()  # the choices whose prompt_token_ids went out
    to_echo = set(range(shape.n)) if shape.echo or shape.echo_logprobs is not None else set()
    echoed: list[Echoed] = []  # the prompt's logprobs, rendered at the first echo (every choice's the same)

    def chunk(choices: list[dict], usage: Usage | None = None, fingerprint: str | None = None) -> bytes:
        body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage.model_dump()
        if fingerprint is not None:  # vLLM's: each choice's last chunk, or the usage chunk when one follows
            body["system_fingerprint"] = fingerprint
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def prompt_token_ids(index: int) -> list[int] | None:
        if index in announced:
            return None
        announced.add(index)
        return shape.prompt_token_ids

    def echo_logprobs() -> Echoed | None:
        if shape.echo_logprobs is None:
            return None
        if not echoed:
            prompt = handle.prompt_logprobs
            echoed.append(Echoed(prompt.prompt_ids, prompt_positions(prompt, shape.tokenizer), shape.echo_logprobs))
        return echoed[0]

    def render(event: Event, usage: StreamUsage) -> bytes | None:
        echo, prompt = "", None
        if event.index in to_echo:  # vLLM's: the echo comes with the choice's first tokens
            to_echo.discard(event.index)
            echo, prompt = shape.echo, echo_logprobs()
        if shape.echo_only:  # the prompt alone; of the token, its id (vLLM's) and how it ended
            event = replace(event, text="", logprobs=None)
        if not (echo or prompt or event.text or event.finish_reason or event.logprobs):
            return None
        logprobs = None if event.logprobs is None and prompt is None else \
            completion_logprobs(event.logprobs or [], token_texts[event.index], offsets[event.index], prompt)
        offsets[event.index] += len(event.text)
        choice = _choice(event.index, echo + event.text, logprobs, event.finish_reason, event.stop_reason,
                         event.token_ids if shape.return_token_ids else None, prompt_token_ids(event.index))
        return chunk([choice], usage.of_choice(event.index) if shape.continuous_usage else None,
                     shape.fingerprint if event.finish_reason is not None and not include_usage else None)

    return stream_answer(handle, shape, include_usage, metrics, [], render,
                         lambda total: chunk([], total, shape.fingerprint))


async def whole(handles: list[RequestHandle], request_id: str, model: str, shapes: list[AnswerShape]) -> dict:
    """vLLM's CompletionResponse: each prompt's n choices in turn (prompt i's choice j at index
    i * n + j), the usage summed over the prompts."""
    out, prompt_tokens, completion_tokens = [], 0, 0
    for handle, shape in zip(handles, shapes):  # all run in the engine at once; read in order
        choices = await gather(handle, shape.n)
        prompt, prompt_logprobs, echoed = handle.prompt_logprobs, None, None
        if prompt is not None:  # asked for (prompt_logprobs, or echo with logprobs): every choice shows them
            long = long_logprobs(prompt.prompt_ids)
            positions = await off_loop(prompt_positions, prompt, shape.tokenizer) if long else \
                prompt_positions(prompt, shape.tokenizer)
            prompt_logprobs = prompt_logprobs_body(positions)
            if shape.echo_logprobs is not None:
                echoed = Echoed(prompt.prompt_ids, positions, shape.echo_logprobs)
        for c in choices:
            logprobs, texts = None, shape.token_texts()
            if c.logprobs is not None:  # a long answer's in a worker thread (seconds of the event loop else)
                entries = [] if shape.echo_only else c.logprobs  # vLLM's echo alone: the prompt's logprobs alone
                long = long_logprobs(entries, echoed.prompt_ids if echoed is not None else None)
                logprobs = await off_loop(completion_logprobs, entries, texts, 0, echoed) if long \
                    else completion_logprobs(entries, texts, 0, echoed)
            text = shape.echo + ("" if shape.echo_only else "".join(c.text))
            token_ids = c.token_ids if shape.return_token_ids else None  # vLLM's: echo_only's sampled token too
            # vLLM's CompletionResponseChoice: the stream choice's keys, and prompt_logprobs and
            # routed_experts (null: a dense model).
            out.append({**_choice(len(out), text, logprobs, c.last.finish_reason, c.last.stop_reason, token_ids,
                                  shape.prompt_token_ids), "prompt_logprobs": prompt_logprobs, "routed_experts": None})
        usage = usage_of(choices)
        prompt_tokens, completion_tokens = prompt_tokens + usage.prompt_tokens, completion_tokens + usage.completion_tokens
    # vLLM's CompletionResponse, key for key as its model_dump() sends it.
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": out, "service_tier": None, "system_fingerprint": shapes[0].fingerprint,
            "usage": AnswerUsage.count(prompt_tokens, completion_tokens).model_dump(),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
