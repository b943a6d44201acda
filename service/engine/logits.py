"""vLLM's logits processors, batched over the rows that need them, with their state on the device.

In vLLM's order (v1/sample/sampler.py): allowed_token_ids, bad_words, min_tokens (EOS and
stop_token_ids masked while fewer tokens were generated), logit_bias, then the penalties
(repetition over prompt + output, frequency and presence over the output only,
vllm/model_executor/layers/utils.py::apply_penalties). Temperature, min-p, top-k and top-p follow
in service/engine/sampling.py.

A row's state (`RowLogits`: output token counts, prompt mask, its last tokens for multi-token
bad words) lives on the device and is updated from the sampled tokens still on the device, so
nothing here waits for the host and the decode pipeline keeps its overlap. Rows that need none
of it carry no state, and a step whose rows need nothing builds nothing (`for_rows` is None).
The logprobs (`StepLogprobs`) are vLLM's default: from the raw logits, before any processing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.sampling import SamplingParams, on_device

_NEG_INF = float("-inf")


class RowLogits:
    """The device state of one row's processors (None where a processor is not used)."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor, stop_ids: frozenset[int], vocab: int,
                 device: torch.device):
        params.check_vocab(vocab)  # an id past the vocabulary would fail the whole step on the device
        self.params = params
        self.vocab = vocab
        p = params
        penalised = p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
        self.counts = torch.zeros(vocab, dtype=torch.int32, device=device) if penalised else None
        self.prompt_mask = None
        if p.repetition_penalty != 1:
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[prompt_ids.long().clamp(0, vocab - 1)] = True
            self.prompt_mask = on_device(mask, torch.bool, device)
        self.allowed = None
        if p.allowed_token_ids is not None:
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[torch.tensor(p.allowed_token_ids, dtype=torch.long)] = True
            self.allowed = on_device(allowed, torch.bool, device)
        self.bias_ids = self.bias_values = None
        if p.logit_bias:
            self.bias_ids = on_device([t for t, _ in p.logit_bias], torch.long, device)
            self.bias_values = on_device([b for _, b in p.logit_bias], torch.float32, device)
        # min_tokens: vLLM masks all_stop_token_ids (EOS and the generation config's, plus stop_token_ids).
        self.stop_ids = on_device(sorted(stop_ids | set(p.stop_token_ids)), torch.long, device) \
            if p.min_tokens else None
        self.bad_last = self.bad_prefix = self.recent = None
        if p.bad_words_token_ids:
            words = p.bad_words_token_ids
            width = max(len(w) - 1 for w in words)
            # Prefixes right-aligned against the row's last `width` output tokens; -2 = "any" (the
            # row's history starts as -1, never a token, so a word longer than the output never matches).
            prefix = torch.full((len(words), max(width, 1)), -2, dtype=torch.long)
            for i, word in enumerate(words):
                if len(word) > 1:
                    prefix[i, prefix.shape[1] - (len(word) - 1):] = torch.tensor(word[:-1])
            self.bad_last = on_device([w[-1] for w in words], torch.long, device)
            self.bad_prefix = on_device(prefix, torch.long, device)
            self.recent = torch.full((prefix.shape[1],), -1, dtype=torch.long, device=device)

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        p = params
        return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 or p.logit_bias
                    or p.allowed_token_ids is not None or p.bad_words_token_ids or p.min_tokens)

    def record(self, token: torch.Tensor) -> None:
        """The row's new token (a 1-element device tensor): counts and recent history."""
        if self.counts is not None:
            self.counts.index_add_(0, token, torch.ones(1, dtype=torch.int32, device=token.device))
        if self.recent is not None:
            self.recent = torch.cat([self.recent[1:], token.to(self.recent.dtype)])


class LogitsProcessors:
    """One step's processors over the rows that need them: `apply` before sampling, `record` after."""

    def __init__(self, states: list[RowLogits | None], generated: list[int]):
        self.states = states
        self.generated = generated  # tokens each row had generated before this one

    @classmethod
    def for_rows(cls, states: list[RowLogits | None], generated: list[int]) -> "LogitsProcessors | None":
        """None when no row needs a processor (the step then pays nothing)."""
        return cls(states, generated) if any(s is not None for s in states) else None

    def _rows(self, attribute: str) -> tuple[list[int], list[RowLogits]]:
        picked = [(i, s) for i, s in enumerate(self.states) if s is not None and getattr(s, attribute) is not None]
        return [i for i, _ in picked], [s for _, s in picked]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()  # the raw logits stay as they are for the logprobs
        device = logits.device
        rows, states = self._rows("allowed")
        if rows:
            index = on_device(rows, torch.long, device)
            logits[index] = logits[index].masked_fill(~torch.stack([s.allowed for s in states]), _NEG_INF)
        rows, states = self._rows("bad_last")
        if rows:
            self._mask_bad_words(logits, rows, states)
        rows, states = self._rows("stop_ids")
        window = [(i, s) for i, s in zip(rows, states) if self.generated[i] < s.params.min_tokens]
        if window:
            at = torch.cat([torch.full_like(s.stop_ids, i) for i, s in window])
            logits.index_put_((at, torch.cat([s.stop_ids for _, s in window])),
                              torch.full(at.shape, _NEG_INF, device=device))
        rows, states = self._rows("bias_ids")
        if rows:
            at = torch.cat([torch.full_like(s.bias_ids, i) for i, s in zip(rows, states)])
            logits.index_put_((at, torch.cat([s.bias_ids for s in states])),
                              torch.cat([s.bias_values for s in states]), accumulate=True)
        rows, states = self._rows("counts")
        if rows:
            logits = self._penalise(logits, rows, states)
        return logits

    def record(self, tokens: torch.Tensor) -> None:
        """After sampling: each row's new token into its state (on the device, no wait)."""
        for i, state in enumerate(self.states):
            if state is not None:
                state.record(tokens[i:i + 1])

    @staticmethod
    def _mask_bad_words(logits: torch.Tensor, rows: list[int], states: list[RowLogits]) -> None:
        """vLLM's bad words: a word's last token is banned once the output ends with the rest of it."""
        for i, s in zip(rows, states):
            width = s.bad_prefix.shape[1]
            match = ((s.bad_prefix == s.recent[-width:]) | (s.bad_prefix == -2)).all(dim=1)
            ban = torch.where(match, _NEG_INF, 0.0)
            logits[i].index_put_((s.bad_last,), ban, accumulate=True)

    @staticmethod
    def _penalise(logits: torch.Tensor, rows: list[int], states: list[RowLogits]) -> torch.Tensor:
        device = logits.device
        index = on_device(rows, torch.long, device)
        values = logits[index]
        counts = torch.stack([s.counts for s in states]).to(values.dtype)
        in_output = counts > 0
        params = [s.params for s in states]
        rep = on_device([p.repetition_penalty for p in params], torch.float32, device)[:, None]
        if any(p.repetition_penalty != 1 for p in params):
            masks = [s.prompt_mask if s.prompt_mask is not None else torch.zeros_like(in_output[0]) for s in states]
            seen = torch.stack(masks) | in_output
            values = torch.where(seen, torch.where(values > 0, values / rep, values * rep), values)
        freq = on_device([p.frequency_penalty for p in params], torch.float32, device)[:, None]
        presence = on_device([p.presence_penalty for p in params], torch.float32, device)[:, None]
        values = values - freq * counts - presence * in_output.to(values.dtype)
        logits[index] = values
        return logits


@dataclass
class TokenLogprob:
    """One generated token's logprob and the alternatives (vLLM's Logprob, per position): the top
    ones by rank, or (``requested``) the logprobs of the request's logprob_token_ids, in its order."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # the token's among the vocabulary (1: the likeliest), where it is reported
    requested: bool = False


class PromptLogprobs:
    """vLLM's prompt logprobs of one prompt, on the host: for each position after the first, its
    token's logprob and rank, and the top k there (from the prefill, service/decode/qwen3_prefill.py)."""

    def __init__(self, prompt_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor,
                 top_logprobs: torch.Tensor, top_ids: torch.Tensor):
        self.prompt_ids = prompt_ids.tolist()
        self._tensors = tuple(t.cpu() for t in (logprobs, ranks, top_logprobs, top_ids))

    def entries(self) -> list[TokenLogprob]:
        """The prompt's positions after the first, in order."""
        logprobs, ranks, top_logprobs, top_ids = (t.tolist() for t in self._tensors)
        return [TokenLogprob(token, logprob, list(zip(ids, values)), rank) for token, logprob, rank, values, ids
                in zip(self.prompt_ids[1:], logprobs, ranks, top_logprobs, top_ids)]


class StepLogprobs:
    """The logprobs of one step's rows that asked for them: gathered on the device, read with the
    tokens. A row wants its top k (an int: vLLM's logprobs) or the logprobs of given token ids (a
    tuple: vLLM's logprob_token_ids, which take the top ones' place)."""

    def __init__(self, logits: torch.Tensor, wanted: list[int | tuple[int, ...] | None], tokens: torch.Tensor):
        self.rows = [i for i, k in enumerate(wanted) if k is not None]
        self.wanted = wanted
        device = logits.device
        index = on_device(self.rows, torch.long, device)
        logprobs = torch.log_softmax(logits[index].float(), dim=-1)
        self.chosen = logprobs.gather(1, tokens[index].long()[:, None])[:, 0]
        k = max((wanted[i] for i in self.rows if isinstance(wanted[i], int)), default=0)
        self.top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
        # Rows with token ids: each gathers its own (padded to the longest list; the padding is never read).
        listed = [(j, wanted[i]) for j, i in enumerate(self.rows) if isinstance(wanted[i], tuple)]
        self.listed_at = {j: n for n, (j, _) in enumerate(listed)}
        self.listed = None
        if listed:
            width = max(len(ids) for _, ids in listed)
            ids = on_device([list(ids) + [0] * (width - len(ids)) for _, ids in listed], torch.long, device)
            self.listed = logprobs[on_device([j for j, _ in listed], torch.long, device)].gather(1, ids)

    @classmethod
    def gather(cls, logits: torch.Tensor, wanted: list[int | tuple[int, ...] | None],
               tokens: torch.Tensor) -> "StepLogprobs | None":
        return cls(logits, wanted, tokens) if any(k is not None for k in wanted) else None

    def to_host(self) -> None:
        """Start the copies to the host (before the step's tokens', whose event the reader waits for)."""
        self.chosen = _to_host(self.chosen)
        if self.top is not None:
            self.top = (_to_host(self.top.values), _to_host(self.top.indices))
        if self.listed is not None:
            self.listed = _to_host(self.listed)

    def entries(self, tokens: list[int]) -> list[TokenLogprob | None]:
        """Per row of the step (after the step's tokens were read): its entry, or None."""
        out: list[TokenLogprob | None] = [None] * len(self.wanted)
        chosen = self.chosen.tolist()
        values, ids = (self.top[0].tolist(), self.top[1].tolist()) if self.top is not None else ([], [])
        listed = self.listed.tolist() if self.listed is not None else []
        for j, i in enumerate(self.rows):
            k = self.wanted[i]
            if isinstance(k, tuple):
                out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(k, listed[self.listed_at[j]])), requested=True)
                continue
            top = list(zip(ids[j][:k], values[j][:k])) if k else []
            out[i] = TokenLogprob(tokens[i], chosen[j], top)
        return out


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
