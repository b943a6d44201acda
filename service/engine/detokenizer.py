"""Token ids -> streamed text, with stop strings.

Byte-level BPE tokens can end inside a UTF-8 character, so text is released only once it decodes
cleanly (vLLM's prefix/read offset scheme). Text that might be the start of a stop string is held
back until it is known not to be; a matched stop string ends the text before it (OpenAI's rule).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now safe to send (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end: everything not yet sent (held-back partial stop strings included)."""
        if not self.stopped and self._read_offset < len(self._ids):
            # An incomplete character at the very end: send what the tokenizer makes of it.
            full = self._tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
            prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
            self.text += full[len(prefix):]
            self._read_offset = len(self._ids)
            self._check_stop()
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta

    def _check_stop(self) -> None:
        if not self._stop or self.stopped:
            return
        longest = max(len(s) for s in self._stop)
        start = max(0, self._emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self) -> str:
        self._check_stop()
        end = len(self.text)
        if not self.stopped:
            end -= self._partial_stop_suffix()
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
