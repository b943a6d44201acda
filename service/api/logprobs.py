"""The engine's token logprobs in vLLM's response shapes: the chat API's `logprobs.content`, the
completions API's `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` (with echo, the
prompt's first), and both APIs' `prompt_logprobs`."""
from __future__ import annotations

from service.api.responses import ChoiceLogProbs, LogProb, LogProbsContent
from service.engine.logits import PromptLogprobs, TokenLogprob

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


# One prompt position as vLLM's dict of token id -> Logprob holds it: (token id, logprob, rank, decoded_token).
Position = list[tuple[int, float, int, str]]


def prompt_positions(prompt: PromptLogprobs, tokenizer) -> list[Position | None]:
    """vLLM's prompt logprobs (LogprobsProcessor._update_prompt_logprobs): None for the first token;
    for each later one the prompt's token (its rank among the vocabulary), then the top ones by rank
    (a top one that is the prompt's token keeps the prompt token's place, with its top rank). The
    texts are vLLM's decoded_token: an incomplete UTF-8 piece completed with the prompt tokens
    before it (the first token is not among them: its position is None)."""
    texts = TokenTexts(tokenizer)
    positions: list[Position | None] = [None]
    for entry in prompt.entries():
        by_id = {entry.token_id: (entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            by_id[token_id] = (logprob, rank)
        positions.append([(token_id, logprob, rank, texts.decoded(token_id))
                          for token_id, (logprob, rank) in by_id.items()])
        texts.advance(entry.token_id)
    return positions


def prompt_logprobs_body(positions: list[Position | None]) -> list[dict | None]:
    """`prompt_logprobs` as vLLM's responses dump them (-inf as FLOOR: clamp_prompt_logprobs)."""
    return [None if position is None else
            {str(token_id): {"logprob": max(logprob, FLOOR), "rank": rank, "decoded_token": text}
             for token_id, logprob, rank, text in position}
            for position in positions]


class Echoed:
    """The prompt's part of a completion's logprobs with echo (vLLM's _create_completion_logprobs
    over the prompt logprobs): each prompt token named by its decoded_token, the first (no logprobs)
    by its own decoding; of each position the first ``top`` + 1 entries (the request's logprobs)."""

    def __init__(self, prompt_ids: list[int], positions: list[Position | None], top: int):
        self.prompt_ids, self.positions, self.top = prompt_ids, positions, top

    def rows(self, texts: TokenTexts) -> list[tuple[str, float | None, dict | None]]:
        rows = []
        for token_id, position in zip(self.prompt_ids, self.positions):
            if position is None:
                rows.append((texts.name(token_id, texts.tokenizer.decode([token_id])), None, None))
                continue
            top = {texts.name(t, text): max(logprob, FLOOR) for t, logprob, _, text in position[:self.top + 1]}
            rows.append((texts.name(token_id, position[0][3]), max(position[0][1], FLOOR), top))
        return rows


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> ChoiceLogProbs:
    """vLLM's chat logprobs: its top_logprobs are the first top_logprobs of the position's logprobs,
    so the sampled token comes first (a sampled token outside the top ones takes the last place);
    with logprob_token_ids, all of them: the sampled token's, then those ids' (vLLM's return_all).
    The sampled token's `bytes` are its text's, also when it is named by its id (vLLM's)."""
    content = []
    for entry in entries:
        top = []
        shown = position_logprobs(entry)
        for token_id, logprob in shown if entry.requested else shown[:len(entry.top)]:
            name = texts.name(token_id, texts.decoded(token_id))
            top.append(LogProb(token=name, logprob=max(logprob, FLOOR), bytes=_utf8(name)))
        decoded = texts.decoded(entry.token_id)
        content.append(LogProbsContent(token=texts.name(entry.token_id, decoded), logprob=max(entry.logprob, FLOOR),
                                       bytes=_utf8(decoded), top_logprobs=top))
        texts.advance(entry.token_id)
    return ChoiceLogProbs(content=content)


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int = 0,
                        echoed: Echoed | None = None) -> dict:
    """vLLM's CompletionLogProbs for these tokens, after the echoed prompt's when given; ``offset``:
    the characters of token text before them (vLLM's offsets add up the tokens' texts)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for text, logprob, top in echoed.rows(texts) if echoed is not None else ():
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
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
