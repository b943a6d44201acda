"""How a choice's generation stops early: stop strings matched as the text streams, in time
proportional to the new text, not to the list; and vLLM's repetition detection (the output's last
tokens a pattern repeated min_count times), in time proportional to the pattern sizes checked.

An Aho-Corasick automaton over the request's stop strings (built once, in Engine.prepare's thread):
each new character moves one state, so a step costs the same with 1 stop string or 1000. Its state's
depth is the longest tail of the text that could still become a stop string: the text the stream
must hold back. (pyahocorasick matches across chunks too, but does not expose that depth.)

The lists are capped (MAX_STOP_STRINGS, MAX_STOP_CHARS) so that building one stays a few
milliseconds: the work a request brings is bounded before it is done.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidRequest

MAX_STOP_STRINGS = 256
MAX_STOP_CHARS = 16384  # all stop strings together


class StopMatcher:
    """Feed text; `feed` returns (end, length) of the first stop string completed, by its end in
    the whole text fed so far (the longest of those ending there), or None."""

    def __init__(self, stops: tuple[str, ...]):
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        terminal = [0]  # the length of the stop string ending at a node, 0 if none
        for stop in stops:
            node = 0
            for char in stop:
                nxt = self._goto[node].get(char)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[node][char] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[node] + 1)
                    terminal.append(0)
                node = nxt
            terminal[node] = len(stop)
        self._fail = [0] * len(self._goto)
        self._match = terminal[:]  # the longest stop string ending at a node, itself or a suffix of it
        queue = deque(self._goto[0].values())
        while queue:
            node = queue.popleft()
            for char, child in self._goto[node].items():
                fail = self._fail[node]
                while fail and char not in self._goto[fail]:
                    fail = self._fail[fail]
                self._fail[child] = self._goto[fail].get(char, 0) if self._goto[fail].get(char) != child else 0
                self._match[child] = terminal[child] or self._match[self._fail[child]]
                queue.append(child)
        self._state = 0
        self._fed = 0

    def fresh(self) -> "StopMatcher":
        """A matcher at the start of a text, sharing these tables (they never change)."""
        other = object.__new__(StopMatcher)
        other.__dict__.update(self.__dict__)
        other._state, other._fed = 0, 0
        return other

    @property
    def pending(self) -> int:
        """Characters at the end of the text that begin some stop string (to hold back)."""
        return self._depth[self._state]

    def feed(self, text: str) -> tuple[int, int] | None:
        goto, fail, match = self._goto, self._fail, self._match
        state, found = self._state, None
        for offset, char in enumerate(text):
            while state and char not in goto[state]:
                state = fail[state]
            state = goto[state].get(char, 0)
            if match[state] and found is None:
                found = (self._fed + offset, match[state])
        self._state, self._fed = state, self._fed + len(text)
        return found


@dataclass(frozen=True)
class RepetitionDetectionParams:
    """vLLM's RepetitionDetectionParams (its name too: pydantic's errors name it), with its rules and
    words: the generation ends (finish_reason "repetition", stop_reason "repetition_detected") once
    the output ends in a pattern of min_pattern_size (0: 1) to max_pattern_size tokens repeated
    min_count times; max_pattern_size 0: off. The request models take it as the body gives it
    (pydantic validates the fields, then these rules run)."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        if self.max_pattern_size < 0 or self.min_pattern_size < 0 or self.min_pattern_size > self.max_pattern_size:
            raise InvalidRequest("max_pattern_size, min_pattern_size must be >=0, with min_pattern_size <= "
                                 "max_pattern_size. Set both to 0 to disable repetitive pattern detection.",
                                 kind="invalid_sampling")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise InvalidRequest("min_count must be >= 2 to detect repetitive patterns in engine output. If you do "
                                 "not wish to detect repetitive patterns, set max_pattern_size to 0.",
                                 kind="invalid_sampling")


class RepetitionDetector:
    """One choice's repetition check (vLLM's check_sequence_repetition, which compares the tail
    anew at every token), kept incrementally: for each pattern size p, how many of the last tokens
    each equal the token p before them. A run of p * (min_count - 1) is the last p * min_count
    tokens repeating a pattern of p, min_count times. A token costs a few vector operations over
    the sizes checked (those that fit max_tokens min_count times), whatever the output's length."""

    def __init__(self, params: RepetitionDetectionParams, max_tokens: int):
        count = params.min_count
        self._sizes = np.arange(max(params.min_pattern_size, 1), min(params.max_pattern_size, max_tokens // count) + 1)
        self._needed = self._sizes * (count - 1)
        self._runs = np.zeros(len(self._sizes), dtype=np.int64)
        self._tokens = np.empty(max_tokens, dtype=np.int64)
        self._length = 0

    @classmethod
    def of(cls, params: RepetitionDetectionParams | None, max_tokens: int) -> "RepetitionDetector | None":
        """A detector when the request asks for one (max_pattern_size > 0), else None."""
        return cls(params, max_tokens) if params is not None and params.max_pattern_size > 0 else None

    def add(self, token: int) -> bool:
        """The choice's next token; whether its output now ends in a repeated pattern."""
        at = self._length
        self._tokens[at] = token
        self._length = at + 1
        back = at - self._sizes  # where each size's previous occurrence of this position is
        same = (back >= 0) & (self._tokens[np.maximum(back, 0)] == token)
        self._runs = np.where(same, self._runs + 1, 0)
        return bool((self._runs >= self._needed).any())
