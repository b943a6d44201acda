"""Stop strings matched as the text streams, in time proportional to the new text, not to the list.

An Aho-Corasick automaton over the request's stop strings (built once, in Engine.prepare's thread):
each new character moves one state, so a step costs the same with 1 stop string or 1000. Its state's
depth is the longest tail of the text that could still become a stop string: the text the stream
must hold back. (pyahocorasick matches across chunks too, but does not expose that depth.)

The lists are capped (MAX_STOP_STRINGS, MAX_STOP_CHARS) so that building one stays a few
milliseconds: the work a request brings is bounded before it is done.
"""
from __future__ import annotations

from collections import deque

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
