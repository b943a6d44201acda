"""The engine's token logprobs in vLLM's response shapes: the chat API's `logprobs.content` and the
completions API's `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`."""
from __future__ import annotations

from service.api.responses import ChoiceLogProbs, LogProb, LogProbsContent
from service.engine.logits import TokenLogprob

FLOOR = -9999.0  # vLLM's: -inf (a banned token) is reported as this
_REPLACEMENT = "\ufffd"
_CONTEXT = 4  # vLLM's: enough sampled tokens before one to finish any UTF-8 character


class TokenTexts:
    """One choice's token texts, as vLLM's LogprobsProcessor decodes them (`decoded_token`): each
    token alone, and one whose text ends in U+FFFD (a piece of a UTF-8 character, Qwen's byte-level
    tokens split CJK characters and emoji) again with the sampled tokens before it
    (`_correct_decoded_token`): "" while the character is incomplete, the whole character (and the
    text of the pieces before it) on the token that completes it, so that the texts join into the
    answer's. `return_tokens_as_token_ids` names the tokens "token_id:<id>" instead. Fed in order
    (`advance`), across a stream's chunks."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.context: list[int] = []  # the last sampled tokens, oldest first

    def decoded(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id])
        return self._completed(token_id) if text.endswith(_REPLACEMENT) else text

    def name(self, token_id: int, decoded: str) -> str:
        return f"token_id:{token_id}" if self.as_ids else decoded

    def advance(self, sampled: int) -> None:
        self.context = (self.context + [sampled])[-_CONTEXT:]

    def _completed(self, token_id: int) -> str:
        """vLLM's _correct_decoded_token, step for step."""
        decode = self.tokenizer.decode
        for count in range(1, len(self.context) + 1):
            context = self.context[-count:]
            full = decode(context + [token_id])
            if full.endswith(_REPLACEMENT):
                continue
            clean = len(context)  # the context before its own pieces of a character
            while clean > 0 and decode([context[clean - 1]]).endswith(_REPLACEMENT):
                clean -= 1
            prefix = decode(context[:clean]) if clean else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""


def position_logprobs(entry: TokenLogprob) -> list[tuple[int, float]]:
    """vLLM's logprobs of one position (append_logprobs_for_next_position): the sampled token first,
    then the top ones by rank; a top token that is the sampled one stays where the sampled one is."""
    by_id = {entry.token_id: entry.logprob}
    for token_id, logprob in entry.top:
        by_id[token_id] = logprob
    return list(by_id.items())


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> ChoiceLogProbs:
    """vLLM's chat logprobs: its top_logprobs are the first top_logprobs of the position's logprobs,
    so the sampled token comes first (a sampled token outside the top ones takes the last place).
    The sampled token's `bytes` are its text's, also when it is named by its id (vLLM's)."""
    content = []
    for entry in entries:
        top = []
        for token_id, logprob in position_logprobs(entry)[:len(entry.top)]:
            name = texts.name(token_id, texts.decoded(token_id))
            top.append(LogProb(token=name, logprob=max(logprob, FLOOR), bytes=_utf8(name)))
        decoded = texts.decoded(entry.token_id)
        content.append(LogProbsContent(token=texts.name(entry.token_id, decoded), logprob=max(entry.logprob, FLOOR),
                                       bytes=_utf8(decoded), top_logprobs=top))
        texts.advance(entry.token_id)
    return ChoiceLogProbs(content=content)


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int = 0) -> dict:
    """vLLM's CompletionLogProbs for these tokens; ``offset``: the characters of text before them."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        text = texts.name(entry.token_id, texts.decoded(entry.token_id))
        tokens.append(text)
        token_logprobs.append(max(entry.logprob, FLOOR))
        # vLLM's: the sampled token and the top ones, all of them (logprobs + 1 at most), sampled first.
        top_logprobs.append({texts.name(t, texts.decoded(t)): max(lp, FLOOR) for t, lp in position_logprobs(entry)})
        text_offset.append(offset)
        offset += len(text)
        texts.advance(entry.token_id)
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}
