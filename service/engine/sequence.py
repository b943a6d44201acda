"""One choice's generation on the scheduler thread: its tokens, its text, and when it is finished."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.logits import RowLogits, TokenLogprob
from service.engine.requests import Event, GenerationRequest, RequestHandle
from service.engine.sampling import SamplingParams, make_generator
from service.engine.stops import RepetitionDetector
from service.engine.structured import RowGrammar
from service.errors import InvalidRequest


@dataclass
class Sequence:
    request: GenerationRequest
    handle: RequestHandle
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    eos_ids: frozenset[int]
    max_model_len: int
    params: SamplingParams
    index: int = 0  # the choice, of the request's n
    logits_state: RowLogits | None = None  # the device state of its logits processors, if any
    forks: list["Sequence"] = field(default_factory=list)  # the request's other choices (this is choice 0)
    generated: int = 0
    last_token: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_at: float | None = None  # time.monotonic() of its last token (inter-token latency)
    retired: bool = False  # left the batch (finished, cancelled, failed): a step still in flight skips it
    grammar: RowGrammar | None = None  # structured output: the tokens it may sample next
    repetition: RepetitionDetector | None = None  # repetition_detection: ends it on a repeated pattern
    token_ids: list[int] = field(init=False)
    # Its logprobs each step: the top k (vLLM's logprobs), or given ids' (logprob_token_ids), or None.
    wants_logprobs: int | tuple[int, ...] | None = field(init=False)
    _pending_ids: list[int] = field(default_factory=list)  # tokens whose text is not sent yet
    _pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = self.handle.choice_token_ids[self.index]
        self.wants_logprobs = self.params.logprob_token_ids or self.params.logprobs

    @classmethod
    def start(cls, request: GenerationRequest, handle: RequestHandle, tokenizer, device: torch.device,
              eos_ids: frozenset[int], max_model_len: int, vocab_size: int) -> "Sequence":
        """Choice 0 of the request, with its other choices in ``forks`` (they share its prefill)."""
        choices = []
        for index in range(request.params.n):
            params = request.params.for_choice(index)
            state = RowLogits(params, request.prompt.input_ids, eos_ids, vocab_size, device) \
                if RowLogits.needed(params) else None
            detok = IncrementalDetokenizer(tokenizer, include_stop=params.include_stop_str_in_output,
                                           skip_special_tokens=params.skip_special_tokens,
                                           matcher=request.new_stop_matcher())
            choices.append(cls(request, handle, detok, make_generator(params, device), eos_ids, max_model_len,
                               params, index, state,
                               grammar=request.grammar.matcher() if request.grammar is not None else None,
                               repetition=RepetitionDetector.of(params.repetition_detection, params.max_tokens)))
        choices[0].forks = choices[1:]
        return choices[0]

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_tokens

    def append(self, token: int, logprob: TokenLogprob | None = None) -> Event | None:
        """One new token: the event to send (None while no text is ready), with finish_reason set
        on the last one (a stop token or EOS, a stop string, max_tokens or the context, a repeated
        pattern: vLLM's order, a stop string winning over the last two as vLLM's detokenizer wins)."""
        params = self.params
        self.generated += 1
        self.last_token = token
        if self.grammar is not None:
            self.grammar.accept(token)
            if self.grammar.failure is not None:  # the request fails: no text its grammar does not match
                self.finish_reason = "error"
                return Event(error=InvalidRequest(f"The answer's grammar (structured output or tool calls) failed "
                                                  f"while generating: {self.grammar.failure}"), index=self.index)
        self.token_ids.append(token)
        self._pending_ids.append(token)
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        # vLLM: stop tokens end the text from the min_tokens-th token on, stop strings only after it.
        if self.generated >= params.min_tokens and \
                (token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)):
            self.finish_reason = "stop"
            # vLLM: the tokenizer's EOS stops with no reason; the generation config's other EOS ids
            # join stop_token_ids, so they are named like them.
            self.stop_reason = None if token == self.detok.eos_token_id else token
            # vLLM leaves the stop token's text out, unless include_stop_str_in_output.
            text = self.detok.add(token) if params.include_stop_str_in_output else ""
            text += self.detok.flush()
        else:
            text = self.detok.add(token, check_stop=self.generated > params.min_tokens)
            if self.detok.stopped:
                self.finish_reason, self.stop_reason = "stop", self.detok.stop_string
            elif self.generated >= params.max_tokens or self.prompt_tokens + self.generated >= self.max_model_len:
                self.finish_reason = "length"
                text += self.detok.flush()
            # Fed every token (the detector keeps its own state); vLLM checks it from min_tokens on.
            elif self.repetition is not None and self.repetition.add(token) and self.generated >= params.min_tokens:
                self.finish_reason, self.stop_reason = "repetition", "repetition_detected"
                text += self.detok.flush()
        if self.finish_reason is None and not text:
            return None
        event = Event(text=text, index=self.index, token_ids=self._pending_ids,
                      logprobs=self._pending_logprobs if self.wants_logprobs is not None else None)
        self._pending_ids, self._pending_logprobs = [], []
        if self.finish_reason is not None:
            event.finish_reason, event.stop_reason = self.finish_reason, self.stop_reason
            event.prompt_tokens, event.completion_tokens = self.prompt_tokens, self.generated
        return event
