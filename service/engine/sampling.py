"""Per-row sampling for a batch: the logits processors, greedy, temperature, min-p, top-k, top-p,
and per-request seeds (vLLM's sampler, in its order).

One call picks the next token of every row. Rows differ in their parameters, so the filters are
vectorised over per-row tensors; a request with a seed owns a torch.Generator, so its tokens do
not depend on what else is in the batch. The processors that change which token is likeliest
(allowed ids, bad words, min_tokens, logit bias, penalties: service/engine/logits.py) come first,
then temperature, min-p, top-k and top-p.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from service.engine.stops import RepetitionDetectionParams
from service.errors import InvalidRequest

if TYPE_CHECKING:
    from service.engine.logits import LogitsProcessors

GREEDY_BELOW = 1e-5  # vLLM's rule: a temperature under this means greedy
MIN_TEMPERATURE = 1e-2  # vLLM raises smaller positive temperatures to this (float32 overflows below)
LOGIT_BIAS_LIMIT = 100.0  # vLLM clamps each bias to [-100, 100]
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's
SEED_RANGE = (-(2**63), 2**63 - 1)  # vLLM's: a 64-bit signed integer


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling, as vLLM's SamplingParams (the fields the engine honours).

    Token-id fields are tuples (hashable, immutable); ``bad_words`` arrive as text and are
    tokenized by Engine.prepare into ``bad_words_token_ids``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False  # vLLM extension: run to max_tokens (benchmarks)
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None  # top logprobs per token (0: only the sampled token's); None: none
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the top k there (-1: all); None: none
    logprob_token_ids: tuple[int, ...] | None = None  # these ids' logprobs per token, in place of the top ones
    repetition_detection: RepetitionDetectionParams | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check(math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature",
               f"temperature must be in [0, 2], got {self.temperature}.")
        _check(math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        _check(self.top_k >= 0, "top_k", f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        _check(math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value) and -2.0 <= value <= 2.0, name, f"{name} must be in [-2, 2], got {value}.")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               f"repetition_penalty must be a finite number greater than zero, got {self.repetition_penalty}.")
        _check(self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "seed",
               f"seed must be a 64-bit signed integer (between {SEED_RANGE[0]} and {SEED_RANGE[1]}), got {self.seed}.")
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}.")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens must be between 0 and max_tokens={self.max_tokens}, got {self.min_tokens}.")
        _check(self.logprobs is None or 0 <= self.logprobs, "logprobs", f"logprobs must be non-negative, got {self.logprobs}.")
        _check(self.prompt_logprobs is None or -1 <= self.prompt_logprobs, "prompt_logprobs",
               f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}.")
        if self.logprobs is not None and self.logprobs > MAX_LOGPROBS:  # vLLM's words (the routes check the sign)
            raise InvalidRequest(f"Requested sample logprobs of {self.logprobs}, which is greater than max allowed: "
                                 f"{MAX_LOGPROBS}", param="logprobs", value=self.logprobs, kind="invalid_sampling")
        if self.logprob_token_ids is not None and len(self.logprob_token_ids) > MAX_LOGPROB_TOKEN_IDS:
            raise InvalidRequest(f"Requested logprob_token_ids of length {len(self.logprob_token_ids)}, which is greater "
                                 f"than max allowed: {MAX_LOGPROB_TOKEN_IDS}", param="logprob_token_ids",
                                 value=len(self.logprob_token_ids), kind="invalid_sampling")
        _check(all(s for s in self.stop), "stop", "stop cannot contain an empty string.")
        _check(all(math.isfinite(b) for _, b in self.logit_bias), "logit_bias", "logit_bias values must be finite numbers.")
        _check(self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
               "allowed_token_ids is not None and empty!")
        if 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if self.greedy:  # vLLM: greedy ignores the filters, and n > 1 would give n equal answers
            _check(self.n == 1, "n", f"n must be 1 when using greedy sampling, got {self.n}.")
            object.__setattr__(self, "top_p", 1.0)
            object.__setattr__(self, "top_k", 0)
            object.__setattr__(self, "min_p", 0.0)
        clamped = tuple((t, min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, b))) for t, b in self.logit_bias)
        object.__setattr__(self, "logit_bias", clamped)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def check_vocab(self, vocab_size: int) -> None:
        """InvalidRequest naming the field whose token ids lie outside the vocabulary (they index
        the logits on the device: an id out of range would fail the whole step), or prompt_logprobs
        over --max-logprobs (-1 is the whole vocabulary: vLLM's words and order)."""
        if self.prompt_logprobs:
            wanted = vocab_size if self.prompt_logprobs == -1 else self.prompt_logprobs
            if wanted > MAX_LOGPROBS:
                raise InvalidRequest(f"Requested prompt logprobs of {wanted}, which is greater than max allowed: "
                                     f"{MAX_LOGPROBS}", param="prompt_logprobs", value=wanted, kind="invalid_sampling")
        outside = [t for t in self.logprob_token_ids or () if not 0 <= t < vocab_size]
        if outside:  # vLLM's words
            raise InvalidRequest(f"token_id(s) {outside} in logprob_token_ids contain out-of-vocab token ids. "
                                 f"Vocabulary size: {vocab_size}", param="logprob_token_ids", value=outside,
                                 kind="invalid_sampling")
        fields = {"logit_bias": [t for t, _ in self.logit_bias], "allowed_token_ids": self.allowed_token_ids or (),
                  "stop_token_ids": self.stop_token_ids,
                  "bad_words": [t for word in self.bad_words_token_ids for t in word]}
        for name, ids in fields.items():
            bad = [t for t in ids if not 0 <= t < vocab_size]
            _check(not bad, name, f"token id(s) {bad[:8]} in {name} are outside the vocabulary (size {vocab_size}).")

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice ``index`` of n: vLLM seeds choice i with seed + i."""
        if self.seed is None or index == 0:
            return self
        seed = (self.seed + index - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]  # stays a 64-bit signed integer
        return replace(self, seed=seed)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param, kind="invalid_sampling")


def on_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host values on ``device`` without waiting for it: from pinned memory, copied
    in stream order (torch.tensor(..., device=cuda) would wait for the step in flight, and the
    decode pipeline would lose its overlap)."""
    tensor = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           processors: "LogitsProcessors | None" = None) -> torch.Tensor:
    """Next token id per row of `logits` [B, V] (float32 math). `logits` is not changed (the raw
    logits give the logprobs)."""
    logits = logits.float()
    if processors is not None:
        logits = processors.apply(logits)  # allowed ids, bad words, min_tokens, logit bias, penalties
    greedy = [p.greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    device = logits.device
    temps = on_device([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32, device)
    logits = logits / temps[:, None]
    if any(p.min_p > 0 for p in params):
        logits = _filter_min_p(logits, params)
    if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
        logits = _filter_top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)
    # Gumbel-max in its exponential form: argmax(p / E), E ~ Exp(1), one draw per row.
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[on_device(unseeded, torch.long, device)] = torch.empty((len(unseeded), probs.shape[1]),
                                                                     device=device).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i] = torch.empty(probs.shape[1], device=device).exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    greedy_ids = logits.argmax(dim=-1)
    mask = on_device(greedy, torch.bool, device)
    return torch.where(mask, greedy_ids, sampled)


def _filter_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """vLLM's min-p: drop tokens whose probability is under min_p times the likeliest one's."""
    min_p = on_device([p.min_p for p in params], torch.float32, logits.device)[:, None]
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p, float("-inf"))


def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = on_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= ks[:, None]
    ps = on_device([p.top_p for p in params], torch.float32, device)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
