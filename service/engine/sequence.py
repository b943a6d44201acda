"""One request's generation on the scheduler thread: its tokens, its text, and when it is finished."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.requests import Event, GenerationRequest, RequestHandle
from service.engine.sampling import make_generator


@dataclass
class Sequence:
    request: GenerationRequest
    handle: RequestHandle
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    eos_ids: frozenset[int]
    max_model_len: int
    generated: int = 0
    last_token: int = 0
    finish_reason: str | None = None
    retired: bool = False  # left the batch (finished, cancelled, failed): a step still in flight skips it
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = self.handle.token_ids

    @classmethod
    def start(cls, request: GenerationRequest, handle: RequestHandle, tokenizer, device: torch.device,
              eos_ids: frozenset[int], max_model_len: int) -> "Sequence":
        return cls(request, handle, IncrementalDetokenizer(tokenizer, request.params.stop),
                   make_generator(request.params, device), eos_ids, max_model_len)

    @property
    def params(self):
        return self.request.params

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_tokens

    def append(self, token: int) -> Event | None:
        """One new token: the event to send (None while no text is ready), with finish_reason set
        on the last one (the end-of-sequence token, a stop string, max_tokens or the context)."""
        self.generated += 1
        self.last_token = token
        self.token_ids.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            text = self.detok.flush()
        else:
            text = self.detok.add(token)
            if self.detok.stopped:
                self.finish_reason = "stop"
            elif self.generated >= self.params.max_tokens or self.prompt_tokens + self.generated >= self.max_model_len:
                self.finish_reason = "length"
                text += self.detok.flush()
        if self.finish_reason is None:
            return Event(text=text) if text else None
        return Event(text=text, finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
                     completion_tokens=self.generated)
