"""The engine's token logprobs in vLLM's response shapes: the chat API's `logprobs.content` and the
completions API's `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`."""
from __future__ import annotations

from service.api.responses import ChoiceLogProbs, LogProb, LogProbsContent
from service.engine.logits import TokenLogprob

FLOOR = -9999.0  # vLLM's: -inf (a banned token) is reported as this


def token_text(tokenizer, token_id: int, as_ids: bool) -> str:
    """vLLM's: the token decoded alone, or "token_id:<id>" (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_ids else tokenizer.decode([token_id])


def _entry(tokenizer, token_id: int, logprob: float, as_ids: bool) -> LogProb:
    text = token_text(tokenizer, token_id, as_ids)
    return LogProb(token=text, logprob=max(logprob, FLOOR), bytes=list(text.encode("utf-8", errors="replace")))


def position_logprobs(entry: TokenLogprob) -> list[tuple[int, float]]:
    """vLLM's logprobs of one position (append_logprobs_for_next_position): the sampled token first,
    then the top ones by rank; a top token that is the sampled one stays where the sampled one is."""
    by_id = {entry.token_id: entry.logprob}
    for token_id, logprob in entry.top:
        by_id[token_id] = logprob
    return list(by_id.items())


def chat_logprobs(entries: list[TokenLogprob], tokenizer, as_ids: bool) -> ChoiceLogProbs:
    """vLLM's chat logprobs: its top_logprobs are the first top_logprobs of the position's logprobs,
    so the sampled token comes first (a sampled token outside the top ones takes the last place)."""
    content = []
    for entry in entries:
        first = _entry(tokenizer, entry.token_id, entry.logprob, as_ids)
        top = [_entry(tokenizer, t, lp, as_ids) for t, lp in position_logprobs(entry)[:len(entry.top)]]
        content.append(LogProbsContent(**first.model_dump(), top_logprobs=top))
    return ChoiceLogProbs(content=content)


def completion_logprobs(entries: list[TokenLogprob], tokenizer, as_ids: bool, offset: int = 0) -> dict:
    """vLLM's CompletionLogProbs for these tokens; ``offset``: the characters of text before them."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        text = token_text(tokenizer, entry.token_id, as_ids)
        tokens.append(text)
        token_logprobs.append(max(entry.logprob, FLOOR))
        # vLLM's: the sampled token and the top ones, all of them (logprobs + 1 at most), sampled first.
        top_logprobs.append({token_text(tokenizer, t, as_ids): max(lp, FLOOR) for t, lp in position_logprobs(entry)})
        text_offset.append(offset)
        offset += len(text)
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}
