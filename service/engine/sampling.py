"""Per-row sampling for a batch: greedy, temperature, top-k, top-p, and per-request seeds.

One call picks the next token of every row. Rows differ in their parameters, so the filters are
vectorised over per-row tensors; a request with a seed owns a torch.Generator, so its tokens do
not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # vLLM's rule: a temperature under this means greedy


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # vLLM extension: run to max_tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token id per row of `logits` [B, V] (float32 math)."""
    logits = logits.float()
    greedy = [p.greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    device = logits.device
    temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
    logits = logits / temps[:, None]
    if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
        logits = _filter_top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)
    # Gumbel-max in its exponential form: argmax(p / E), E ~ Exp(1), one draw per row.
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), device=device).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i] = torch.empty(probs.shape[1], device=device).exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    greedy_ids = logits.argmax(dim=-1)
    mask = torch.tensor(greedy, device=device)
    return torch.where(mask, greedy_ids, sampled)


def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor([p.top_p for p in params], device=device)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
