"""Structured outputs: a request's constraint (JSON schema, regex, choice, grammar) as a token mask.

The grammar library is llguidance, vLLM's `guidance` backend (docs/DEPENDENCIES.md says why it and
not xgrammar). Three parts, each used where its work belongs:

- `Constraint`: what a request asks for; the HTTP layer builds it from `response_format`,
  `structured_outputs` or the tools. Hashable: it is the compile cache's key.
- `GrammarCompiler.compile` (any thread; the serving layer calls it off the event loop, before the
  request is queued): the constraint compiled against the tokenizer once, its first mask computed
  (not in the scheduler's step), and cached; a schema, regex or grammar that does not compile is an
  InvalidRequest naming the request field it came from.
- `RowGrammar` (the scheduler thread): one running request's matcher, advanced by every token the
  request samples. `TokenMask.of(rows)` fills the bitmask of the rows that have one; `apply` masks
  those rows' logits inside the batched sampling step. Rows without a grammar are never touched.

JSON schemas follow vLLM's default backend (xgrammar): an object schema that does not say
`additionalProperties` allows no other properties, and whitespace may separate tokens unless the
request asks for compact JSON (`disable_any_whitespace`). One thing vLLM does not do: in JSON (and
tool calls) at most WHITESPACE_RUN whitespace-only tokens follow each other. Small models otherwise
get stuck emitting line breaks until max_tokens; pretty-printed JSON needs two or three (a line
break, its indentation).
"""
from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from service.engine.sampling import on_device
from service.errors import InvalidRequest

log = logging.getLogger(__name__)

ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar", "lark"]
CACHE_SIZE = 256  # compiled grammars kept (agent frameworks send the same tools and schemas each turn)
WHITESPACE_RUN = 8  # whitespace-only tokens in a row, at most, in JSON
MAX_TOKEN_BYTES = 64  # longer than any token of Qwen's vocabulary
TOO_DEEP = "it is nested too deeply"  # a schema Python cannot recurse through (llguidance refuses ~300 levels anyway)


@dataclass(frozen=True)
class Constraint:
    """kind: json (spec: a JSON schema as JSON text), json_object, regex, choice (spec: a JSON list of
    strings), grammar (GBNF/EBNF or Lark, as vLLM takes), lark (llguidance's own Lark: the tool-call
    grammars). source: the request field it came from, for error messages (not part of the key)."""

    kind: ConstraintKind
    spec: str = ""
    compact: bool = False  # JSON without whitespace between tokens (vLLM's disable_any_whitespace)
    whitespace_pattern: str | None = None  # JSON whitespace as this regex instead
    source: str = field(default="structured_outputs", compare=False)


def json_grammar_schema(schema: Any, *, compact: bool = False, whitespace_pattern: str | None = None) -> dict:
    """The schema as llguidance compiles it: objects closed unless they say otherwise (xgrammar's
    strict mode, vLLM's default), whitespace options in its `x-guidance` key. RecursionError for
    a schema nested deeper than Python recurses (`schema_json` and the compiler answer it)."""
    if schema is True:
        schema = {}  # any JSON value
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema is an object (or true)")
    closed = copy.deepcopy(schema)
    _close_objects(closed)
    options: dict[str, Any] = {"whitespace_flexible": not compact}
    if whitespace_pattern is not None:
        options["whitespace_pattern"] = whitespace_pattern
    closed["x-guidance"] = {**options, **closed.get("x-guidance", {})}
    return closed


def schema_json(schema: Any, source: str) -> str:
    """A schema (a request's JSON value) as JSON text; InvalidRequest naming `source` when it is
    nested deeper than Python recurses (orjson reads 1024 levels; json.dumps writes about 1000)."""
    try:
        return json.dumps(schema)
    except RecursionError:
        raise InvalidRequest(f"The JSON schema in {source} is nested too deeply", param=source) from None


_ASCII_CLASSES = {"\\d": "[0-9]", "\\D": "[^0-9]", "\\w": "[0-9A-Za-z_]", "\\W": "[^0-9A-Za-z_]"}


def ecma_regex(pattern: str) -> str:
    """The regex with \\d and \\w as ECMAScript reads them (JSON Schema's dialect, and xgrammar's):
    ASCII only. The Rust regex llguidance runs takes them as Unicode classes (any script's digits)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            escape = pattern[i:i + 2]
            out.append(_ASCII_CLASSES.get(escape, escape))  # nested in a class too: Rust regex takes [a[0-9]]
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def _close_objects(node: Any) -> None:
    """Objects closed, patterns read as ECMAScript's (in place)."""
    if isinstance(node, dict):
        for value in node.values():
            _close_objects(value)
        if "additionalProperties" not in node and ("properties" in node or "patternProperties" in node):
            node["additionalProperties"] = False
        if isinstance(node.get("pattern"), str):
            node["pattern"] = ecma_regex(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            node["patternProperties"] = {ecma_regex(k): v for k, v in node["patternProperties"].items()}
    elif isinstance(node, list):
        for item in node:
            _close_objects(item)


@dataclass(frozen=True)
class Vocabulary:
    """What the grammars need to know of the tokenizer beyond llguidance's view of it."""

    eos_ids: frozenset[int]
    words: int  # int32 words of one row's bitmask
    whitespace_ids: frozenset[int]  # tokens that are only spaces, tabs and line breaks
    not_whitespace: torch.Tensor  # [words] int32: every bit set but those of whitespace_ids
    # Added tokens (llguidance takes them all as special: <tool_call>, <think>, ... too) but EOS. Its
    # precomputed masks for JSON strings and the like ("slices") can allow them where consume_token
    # then refuses them (llguidance 1.7.6), which ended the answer as a plain "stop" mid-value.
    special_bits: Any = None  # numpy uint32 [words]: the bits of those tokens
    plain_tokens: dict[bytes, int] = field(default_factory=dict)  # a token's bytes -> it, added tokens left out


class Grammar:
    """A compiled constraint: immutable, shared by every run of every request that asks for it."""

    def __init__(self, template, vocabulary: Vocabulary, limit_whitespace: bool):
        self._template = template  # an LLMatcher never advanced; each row gets a copy
        self._vocabulary = vocabulary
        self._limit_whitespace = limit_whitespace

    def matcher(self) -> "RowGrammar":
        return RowGrammar(self._template.deep_copy(), self._vocabulary, self._limit_whitespace)


class RowGrammar:
    """One running request's grammar state (the scheduler thread only)."""

    def __init__(self, matcher, vocabulary: Vocabulary, limit_whitespace: bool):
        self._matcher = matcher
        self._vocabulary = vocabulary
        self._limit_whitespace = limit_whitespace
        self._whitespace_run = 0
        self.words = vocabulary.words
        self.ended = False  # an end-of-sequence token was sampled: from here on nothing is masked (vLLM)
        self.failure: str | None = None  # why the matcher gave up (its request ends with the error)

    def accept(self, token: int) -> None:
        """Advance by the token the row sampled (its mask allowed it; ignore_eos may go on past the end)."""
        if self.ended:
            return
        if token in self._vocabulary.eos_ids:
            self.ended = True
            return
        self._whitespace_run = self._whitespace_run + 1 if token in self._vocabulary.whitespace_ids else 0
        if not self._matcher.consume_token(token):
            # Not the token (its mask allowed it): the grammar past llguidance's limits, e.g. a rule of
            # 2000+ alternatives ("Current row has 2002 items; max is 2000"). The matcher would allow
            # only the end now: an answer its grammar does not match. Its request fails instead, as
            # on vLLM. The reason's first line only (llguidance's error holds the whole grammar).
            error = self._matcher.get_error().strip()
            self.failure = error.splitlines()[0][:500] if error else "the grammar's matcher stopped"
            log.warning("grammar failed at token %d: %s", token, self.failure)

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        row = bitmask[index]
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        words = row.numpy().view("uint32")
        dropped = False
        hits = words & self._vocabulary.special_bits  # the added tokens the mask allows (usually none)
        for word in hits.nonzero()[0]:
            bits = int(hits[word])
            while bits:  # each one: would the matcher take it?
                bit = bits & -bits
                bits ^= bit
                if not self._matcher.validate_tokens([int(word) * 32 + bit.bit_length() - 1]):
                    words[word] &= ~bit & 0xFFFFFFFF
                    dropped = True
        if dropped and not words.any():
            # The grammar forces text that spells an added token ("<tool_call>" as a JSON value): the
            # mask held only that token, which the matcher refuses. Its text in plain tokens instead.
            forced = self._matcher.compute_ff_bytes()
            for end in range(min(len(forced), MAX_TOKEN_BYTES), 0, -1):  # the longest plain token it starts with
                token = self._vocabulary.plain_tokens.get(forced[:end])
                if token is not None and self._matcher.validate_tokens([token]):
                    words[token >> 5] |= 1 << (token & 31)
                    break
        if self._limit_whitespace and self._whitespace_run >= WHITESPACE_RUN:
            limited = row & self._vocabulary.not_whitespace
            if limited.any():  # something else is allowed: take it
                row.copy_(limited)


class TokenMask:
    """The allowed tokens of the grammar rows of one batched sampling step (a bitmask per row, filled
    on the host; unpacked on the device by `apply`)."""

    _shifts: dict[torch.device, torch.Tensor] = {}

    def __init__(self, rows: list[int], bitmask: torch.Tensor):
        self.rows = rows
        self.bitmask = bitmask

    @classmethod
    def of(cls, grammars: Sequence[RowGrammar | None]) -> "TokenMask | None":
        """The mask for a step whose rows have these grammars (None: a row without one, or one that
        has left the batch); None when no row needs masking."""
        rows = [i for i, g in enumerate(grammars) if g is not None and not g.ended]
        if not rows:
            return None
        words = grammars[rows[0]].words
        # Pinned, so the copy to the device does not wait; a fresh tensor per step: the caching host
        # allocator does not hand it out again before that copy has run.
        bitmask = torch.empty((len(rows), words), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        for k, i in enumerate(rows):
            grammars[i].fill(bitmask, k)
        return cls(rows, bitmask)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with those of the tokens a grammar row may not take at -inf (a new tensor: the
        decode step's own output buffer is left as it is)."""
        device = logits.device
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        bits = self.bitmask.to(device, non_blocking=True)
        vocab = logits.shape[1]
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(self.rows), -1)[:, :vocab].bool()
        if len(self.rows) == logits.shape[0]:
            return logits.masked_fill(~allowed, float("-inf"))
        blocked = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        blocked[on_device(self.rows, torch.long, device)] = ~allowed  # no wait for the forward in flight
        return logits.masked_fill(blocked, float("-inf"))


class GrammarCompiler:
    """Constraints -> Grammars for one tokenizer, cached. The tokenizer's llguidance form is built on
    the first structured request (about a second for Qwen's 151k tokens), not at start-up."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], cache_size: int = CACHE_SIZE):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._cache: OrderedDict[Constraint, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._vocabulary: Vocabulary | None = None

    def compile(self, constraint: Constraint) -> Grammar:
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                return cached
        grammar = self._compile(constraint)  # outside the lock: llguidance drops the GIL while it builds
        with self._lock:
            self._cache[constraint] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, constraint: Constraint) -> Grammar:
        import llguidance

        tokenizer, vocabulary = self._llguidance_tokenizer()
        try:
            text = _llguidance_grammar(constraint)
            error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        except (ValueError, TypeError) as exc:
            error = str(exc)
        except RecursionError:  # reading or closing a schema nested deeper than Python recurses
            error = TOO_DEEP
        if not error:
            matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
            # The first mask builds the lexer states every row's copy shares (a large choice: 150 ms
            # on the tiny test vocabulary): here, off the scheduler thread (llguidance drops the GIL),
            # not in the first step of a row, which held every running row's next token as long.
            matcher.compute_bitmask()
            error = matcher.get_error() if matcher.is_error() else ""
        if error:
            what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
                    "grammar": "grammar", "lark": "grammar"}[constraint.kind]
            raise InvalidRequest(f"Invalid {what} in {constraint.source}: {error.strip()}", param=constraint.source)
        return Grammar(matcher, vocabulary, limit_whitespace=constraint.kind in ("json", "json_object", "lark"))

    def _llguidance_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size,
                                                         eos_token=sorted(self._eos_ids))
                self._vocabulary = _vocabulary(tokenizer, self._eos_ids, self._vocab_size)
                self._ll_tokenizer = tokenizer
            return self._ll_tokenizer, self._vocabulary


def _vocabulary(tokenizer, eos_ids: frozenset[int], vocab_size: int) -> Vocabulary:
    import numpy as np

    words = (vocab_size + 31) // 32
    not_whitespace = np.full(words, 0xFFFFFFFF, dtype=np.uint32)
    special = np.zeros(words, dtype=np.uint32)
    whitespace, plain = [], {}
    for i in range(min(tokenizer.vocab_size, vocab_size)):  # one pass over Qwen's 151k tokens
        text, bit = tokenizer.decode_bytes([i]), np.uint32(1 << (i & 31))
        if text and not text.strip(b" \t\n\r"):
            whitespace.append(i)
            not_whitespace[i >> 5] &= ~bit
        if not tokenizer.is_special_token(i):
            plain.setdefault(text, i)
        elif i not in eos_ids:
            special[i >> 5] |= bit
    return Vocabulary(eos_ids, words, frozenset(whitespace), torch.from_numpy(not_whitespace.view(np.int32)),
                      special, plain)


def choice_lark(choices: list[str]) -> str:
    """vLLM's choice (the answer is exactly one of the strings, as written) as one lexer terminal,
    an alternation of JSON-quoted literals (Lark's string syntax): llguidance's own `choice` makes a
    parser alternative of each string, and its Earley parser gives up past 2000 of them ("Current row
    has 2002 items; max is 2000"); the lexer takes tens of thousands (llguidance's syntax docs advise a
    terminal for large alternations)."""
    return "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(choice) for choice in choices)


def _llguidance_grammar(constraint: Constraint) -> str:
    """The constraint in llguidance's input form (it checks it; ValueError for what does not parse)."""
    import llguidance

    kind, spec = constraint.kind, constraint.spec
    if kind in ("json", "json_object"):
        try:
            schema = json.loads(spec) if kind == "json" else {"type": "object"}
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        schema = json_grammar_schema(schema, compact=constraint.compact, whitespace_pattern=constraint.whitespace_pattern)
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(ecma_regex(spec))
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(choice_lark(json.loads(spec)))
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec)  # GBNF (root ::= ...) or Lark, as llguidance reads them
    return llguidance.LLMatcher.grammar_from_lark(spec)
