"""Token ids -> streamed text, with stop strings.

Byte-level BPE tokens can end inside a UTF-8 character, so text is released only once it decodes
cleanly (vLLM's prefix/read offset scheme); an answer that ends inside one ends before it. Text
that might be the start of a stop string is held back until it is known not to be; a matched stop
string ends the text before it (OpenAI's rule), or after it with include_stop_str_in_output (vLLM's). Stop strings are matched by an automaton
(service/engine/stops.py): the cost of a token is that of its new characters.
"""
from __future__ import annotations

from service.engine.stops import StopMatcher

# A character is at most 4 bytes and a byte-level token holds at least one: text that still ends in
# U+FFFD this many tokens on is bytes that are not UTF-8 (0xFF, say), and whether it still does
# shows in its last tokens alone. Decoding the whole run again at each token was quadratic, in the
# scheduler thread: a request sampling only such bytes slowed every row's steps.
TAIL_TOKENS = 32


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True, matcher: StopMatcher | None = None):
        self._tokenizer = tokenizer
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        stop = tuple(s for s in stop if s)
        self._matcher = matcher if matcher is not None else (StopMatcher(stop) if stop else None)
        self._include_stop = include_stop
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self._emitted = 0
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text (vLLM's stop_reason)

    def add(self, token_id: int, *, check_stop: bool = True) -> str:
        """Append one token; return the text that is now safe to send (maybe ""). ``check_stop``
        False: a stop string completed now does not end the text (vLLM: not before min_tokens)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        if len(self._ids) - self._read_offset > TAIL_TOKENS and \
                self._decode(self._ids[-TAIL_TOKENS:]).endswith("\ufffd"):
            return self._release()  # still not text: as the whole run would decode
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._extend(full[len(prefix):], check_stop)
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end: the text not yet sent (held-back partial stop strings). Tokens still waiting for
        the rest of their character stay unsent, as in vLLM (tokenizers' DecodeStream never emits
        an incomplete character): an answer cut inside one ends before it, not with U+FFFD."""
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _extend(self, new: str, check_stop: bool) -> None:
        self.text += new
        if self._matcher is None:
            return
        found = self._matcher.feed(new)
        if found is not None and check_stop:
            end, length = found  # `end`: the stop string's last character, counted over the text so far
            self.stop_string = self.text[end - length + 1:end + 1]
            cut = end + 1 if self._include_stop else end - length + 1
            self.text = self.text[:max(cut, self._emitted)]  # text already sent stays sent
            self.stopped = True

    def _release(self) -> str:
        end = len(self.text)
        if not self.stopped and self._matcher is not None:
            end -= min(self._matcher.pending, end - self._emitted)
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta
