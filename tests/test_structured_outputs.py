"""Structured outputs in the engine (no HTTP): the tiny model's random weights, sampled with its
generation_config defaults, still give answers that match the JSON schema, regex, choice or grammar;
rows without a grammar are not touched; a step with grammar rows keeps the pipelining."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch
from PIL import Image

from service.engine.structured import WHITESPACE_RUN, Constraint, TokenMask
from service.errors import InvalidRequest
from tests.conftest import running_engine

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "none"]},
    "verified": {"type": "boolean"},
}, "required": ["name", "age", "pet", "verified"]}
ORDER = {"type": "object", "properties": {
    "items": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}},
    "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
}, "required": ["items", "note"]}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    yield from running_engine(tiny_model_dir, max_model_len=1024, max_batch_size=8, max_queue=32)


def ask(engine, constraint: Constraint | None, text="Answer in JSON.", images=(), **sampling):
    sampling.setdefault("max_tokens", 600)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    grammar = engine.compile_grammar(constraint) if constraint is not None else None
    return engine.prepare([{"role": "user", "content": content}], list(images), grammar=grammar, **sampling)


def run_all(engine, requests) -> list:
    with engine.paused():  # admitted together: one batch
        handles = [engine.submit(r) for r in requests]
    results = []
    for handle in handles:
        events = list(handle)
        assert events[-1].error is None, events[-1].error
        results.append(("".join(e.text for e in events), events[-1].finish_reason, list(handle.token_ids)))
    return results


def closed(schema):
    """The schema as the answer must satisfy it: objects without additionalProperties are closed
    (vLLM's default backend, xgrammar, reads them so)."""
    schema = json.loads(json.dumps(schema))

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
            if "properties" in node:
                node.setdefault("additionalProperties", False)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(schema)
    return schema


@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person", "order"])
def test_json_schema_answers_are_valid_for_the_schema_with_random_weights(engine, schema):
    results = run_all(engine, [ask(engine, Constraint("json", json.dumps(schema))) for _ in range(8)])
    for text, finish, _ in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), closed(schema))


def test_json_object_is_an_object_and_compact_json_has_no_whitespace(engine):
    results = run_all(engine, [ask(engine, Constraint("json_object")) for _ in range(4)])
    for text, finish, _ in results:  # any object may be long: max_tokens may cut it (vLLM's behaviour)
        assert isinstance(json.loads(text), dict) if finish == "stop" else text.startswith("{"), text
    assert any(finish == "stop" for _, finish, _ in results)
    compact = Constraint("json", json.dumps(PERSON), compact=True)
    for text, finish, _ in run_all(engine, [ask(engine, compact) for _ in range(4)]):
        value = json.loads(text)
        assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False), text


def test_regex_choice_and_grammars_are_matched(engine):
    cases = [
        (Constraint("regex", r"[a-c]{2}-[0-9]{1,3}"), lambda t: re.fullmatch(r"[a-c]{2}-[0-9]{1,3}", t)),
        (Constraint("choice", json.dumps(["red", "green", "blue jeans"])), lambda t: t in ("red", "green", "blue jeans")),
        # Prefixes of each other, and the empty string: each an answer of its own, nothing in between.
        (Constraint("choice", json.dumps(["", "no", "no way", "n\\o"])), lambda t: t in ("", "no", "no way", "n\\o")),
        (Constraint("grammar", 'root ::= "x" ("y" | "z")+ "!"'), lambda t: re.fullmatch(r"x[yz]+!", t)),  # GBNF
        (Constraint("grammar", 'start: "(" NUMBER ")"\nNUMBER: /[0-9]{1,4}/'), lambda t: re.fullmatch(r"\(\d{1,4}\)", t)),
    ]
    results = run_all(engine, [ask(engine, c, max_tokens=100) for c, _ in cases for _ in range(3)])
    for (text, finish, _), (constraint, matches) in zip(results, [case for case in cases for _ in range(3)]):
        assert finish == "stop" and matches(text), (constraint, text)


def test_text_that_spells_an_added_token_is_produced_and_the_answer_matches(engine):
    """llguidance's masks offered the added token <tool_call> where a JSON value or regex spells its
    text, and its matcher then refused that token: the answer ended as a plain "stop" mid-value.
    Spelt out here, in plain tokens, and free string values never hold an added token either."""
    tool_call = {"type": "object", "properties": {"tag": {"const": "<tool_call>"}, "think": {"enum": ["</think>"]}},
                 "required": ["tag", "think"]}
    free = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 40}}, "required": ["note"]}
    cases = [
        (Constraint("json", json.dumps(tool_call)), lambda t: json.loads(t) == {"tag": "<tool_call>", "think": "</think>"}),
        (Constraint("regex", r'Sure <tool_call>\n\{"name": "get_weather"\}'),
         lambda t: t == 'Sure <tool_call>\n{"name": "get_weather"}'),
        (Constraint("json", json.dumps(free)), lambda t: isinstance(json.loads(t)["note"], str)),
    ]
    results = run_all(engine, [ask(engine, c, max_tokens=200, temperature=1.0, seed=i) for c, _ in cases for i in range(3)])
    added = set(engine.tokenizer.added_tokens_decoder) - {engine.tokenizer.eos_token_id}
    for (text, finish, ids), (constraint, matches) in zip(results, [case for case in cases for _ in range(3)]):
        assert finish == "stop" and matches(text), (constraint, text)
        assert not added & set(ids[:-1]), (constraint, ids)  # plain tokens only (the last one ends the answer)


def test_regex_and_schema_patterns_read_digits_and_words_as_ecmascript_does(engine):
    """\\d is [0-9] and \\w [0-9A-Za-z_], as in JSON Schema (ECMA-262) and vLLM's xgrammar; the regex
    engine under llguidance would take any script's digits and letters."""
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^\\w{4}$"}}, "required": ["code"]}
    requests = [ask(engine, Constraint("regex", r"\d{6}[\d-]{2}"), max_tokens=40) for _ in range(4)]
    requests += [ask(engine, Constraint("json", json.dumps(schema)), max_tokens=200) for _ in range(4)]
    results = run_all(engine, requests)
    for text, finish, _ in results[:4]:
        assert finish == "stop" and re.fullmatch(r"[0-9]{6}[0-9-]{2}", text), text
    for text, finish, _ in results[4:]:
        assert finish == "stop" and re.fullmatch(r"[0-9A-Za-z_]{4}", json.loads(text)["code"]), text


def test_a_finished_grammar_ends_with_stop_and_max_tokens_still_cuts(engine):
    (text, finish, ids), = run_all(engine, [ask(engine, Constraint("choice", '["yes"]'))])
    assert (text, finish) == ("yes", "stop")
    assert ids[-1] in engine.scheduler._eos_ids  # the grammar left only the end of sequence to sample
    (text, finish, ids), = run_all(engine, [ask(engine, Constraint("json", json.dumps(PERSON)), max_tokens=4)])
    assert finish == "length" and len(ids) == 4 and text.startswith("{")


def test_past_the_end_with_ignore_eos_the_row_is_free_again(engine):
    (text, finish, ids), = run_all(engine, [ask(engine, Constraint("choice", '["yes"]'), ignore_eos=True,
                                                max_tokens=12)])
    assert finish == "length" and len(ids) == 12 and text.startswith("yes")


def test_rows_without_a_grammar_decode_the_same_beside_grammar_rows(engine):
    free = [ask(engine, None, text=f"Tell me about {n}.", max_tokens=40, temperature=0.0) for n in ("cats", "rain")]
    alone = [ids for _, _, ids in run_all(engine, free)]
    constrained = [ask(engine, Constraint("json", json.dumps(PERSON)), temperature=0.0) for _ in range(3)]
    mixed = run_all(engine, [free[0], *constrained, free[1]])
    assert [mixed[0][2], mixed[-1][2]] == alone
    solo = run_all(engine, constrained[:1])[0]
    assert all(r == solo for r in mixed[1:-1])  # greedy under a grammar does not depend on the batch either


def test_steps_with_grammar_rows_launch_the_next_forward_before_reading_tokens(engine, monkeypatch):
    """The pipelining rule: step n+1's forward is queued before step n's tokens are read on the host
    (then the grammars advance, then n+1 is sampled)."""
    from service.engine import scheduler

    deadline = time.monotonic() + 10
    while engine.scheduler._inflight is not None and time.monotonic() < deadline:  # the last test's last step
        time.sleep(0.01)
    log: list[str] = []
    decode, read = engine.scheduler.batch.decode, scheduler._Step.host_tokens
    monkeypatch.setattr(engine.scheduler.batch, "decode", lambda tokens: (log.append("forward"), decode(tokens))[1])
    monkeypatch.setattr(scheduler._Step, "host_tokens", lambda step: (log.append("read"), read(step))[1])
    (_, finish, ids), = run_all(engine, [ask(engine, Constraint("regex", "[a-z]{200}"), max_tokens=12)])
    assert (finish, len(ids)) == ("length", 12)
    reads = [i for i, entry in enumerate(log) if entry == "read"]
    for k, at in enumerate(reads[:-1], start=1):  # the last read has no next step: the row had ended
        assert log[:at].count("forward") >= k + 1, log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host waits for the device only on CUDA")
def test_launching_and_sampling_a_step_never_waits_for_the_device(engine, monkeypatch):
    """Rows with and without grammars, leaving and joining at different steps: launching a step and
    sampling a grammar step queue their work without a host-device synchronisation (torch's sync
    debug mode raises on one), so the host reads step n while step n+1 runs."""
    scheduler = engine.scheduler

    def strict(method):
        def call(*args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    for name in ("_launch_step", "_sample_grammar_step"):
        monkeypatch.setattr(scheduler, name, strict(getattr(scheduler, name)))
    first = [ask(engine, Constraint("regex", "[a-z]{200}"), max_tokens=6 + 4 * i) for i in range(2)]
    first += [ask(engine, None, text=f"row {i}", max_tokens=5 + 3 * i, temperature=0.0) for i in range(2)]
    with engine.paused():
        handles = [engine.submit(r) for r in first]
    while len(handles[-1].token_ids) < 2:
        time.sleep(0.001)
    handles += [engine.submit(ask(engine, None, text="late", max_tokens=4)),
                engine.submit(ask(engine, Constraint("regex", "[a-z]{200}"), max_tokens=4))]
    for handle in handles:
        events = list(handle)
        assert events[-1].error is None and events[-1].finish_reason is not None, events[-1].error


def test_a_json_answer_about_an_image(engine):
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    text, finish, _ = run_all(engine, [ask(engine, Constraint("json", json.dumps(PERSON)), "Who is this?", [image])])[0]
    assert finish == "stop"
    jsonschema.validate(json.loads(text), closed(PERSON))


def test_invalid_constraints_are_refused_naming_their_field_and_valid_ones_cached(engine):
    cases = [(Constraint("json", '{"type": "objec"}', source="response_format"), "response_format"),
             (Constraint("json", "{not json", source="structured_outputs.json"), "structured_outputs.json"),
             (Constraint("regex", "a(b", source="structured_outputs.regex"), "structured_outputs.regex"),
             (Constraint("grammar", "root ::= missing_rule", source="structured_outputs.grammar"),
              "structured_outputs.grammar")]
    for constraint, field in cases:
        with pytest.raises(InvalidRequest) as info:
            engine.compile_grammar(constraint)
        assert info.value.param == field and field in info.value.message
    schema = Constraint("json", json.dumps(PERSON))
    assert engine.compile_grammar(schema) is engine.compile_grammar(Constraint("json", json.dumps(PERSON)))


def test_the_mask_touches_grammar_rows_only(engine):
    grammar = engine.compile_grammar(Constraint("choice", '["cat"]'))
    row = grammar.matcher()
    logits = torch.randn(3, engine.model.config.get_text_config().vocab_size)
    before = logits.clone()
    masked = TokenMask.of([None, row, None]).apply(logits)
    assert torch.equal(logits, before)  # the step's own logits are not changed
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all("cat".startswith(engine.tokenizer.decode([t])) for t in allowed)
    assert TokenMask.of([None, None]) is None


def test_json_whitespace_runs_are_bounded(engine):
    grammar = engine.compile_grammar(Constraint("json_object"))
    row = grammar.matcher()
    newline = engine.tokenizer.convert_tokens_to_ids("Ċ")
    row.accept(engine.tokenizer.convert_tokens_to_ids("{"))
    for _ in range(WHITESPACE_RUN):
        mask = TokenMask.of([row])
        logits = mask.apply(torch.zeros(1, engine.model.config.get_text_config().vocab_size))
        assert torch.isfinite(logits[0, newline])
        row.accept(newline)
    logits = TokenMask.of([row]).apply(torch.zeros(1, logits.shape[1]))
    assert not torch.isfinite(logits[0, newline]) and torch.isfinite(logits[0]).any()


def test_running_rows_keep_their_pace_when_a_large_grammar_starts(engine):
    """A grammar's first mask builds llguidance's lexer states (a rule of 30000 literals: ~120 ms on
    the tiny vocabulary, more on Qwen's 151k tokens). Computed by the first step of its row, in the
    scheduler thread, it held every running row's next token as long; compile_grammar (a worker
    thread: llguidance drops the GIL) computes it once, and each row's copy shares it."""
    import threading

    import llguidance

    lark = "start: " + " | ".join(json.dumps(f"option number {i} " + "y" * 30) for i in range(30000))
    grammar = engine.compile_grammar(Constraint("grammar", lark))
    cold = llguidance.LLMatcher(engine.grammars._llguidance_tokenizer()[0], llguidance.grammar_from("grammar", lark),
                                log_level=0)
    started = time.perf_counter()
    cold.compute_bitmask()  # what the first step of the row cost the scheduler thread
    cold_s = time.perf_counter() - started

    running = engine.submit(engine.prepare([{"role": "user", "content": "go on"}], [], max_tokens=500, ignore_eos=True))
    stamps: list[float] = []
    reader = threading.Thread(target=lambda: stamps.extend(time.perf_counter() for _ in running))
    reader.start()
    while len(stamps) < 20:
        time.sleep(0.01)
    joined = time.perf_counter()
    # It then fails (2000+ alternatives are past llguidance's parser: the test below); its mask came first.
    events = list(engine.submit(engine.prepare([{"role": "user", "content": "pick one"}], [], grammar=grammar,
                                               max_tokens=3)))
    reader.join()
    assert events[-1].last
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > joined][:50]
    assert max(gaps) < cold_s / 3, (max(gaps), cold_s)


def test_a_grammar_past_llguidances_limits_fails_its_request_and_only_it(engine):
    """A rule of 2000+ alternatives compiles, but llguidance's parser gives up at its first token
    ("Current row has 2502 items; max is 2000"): the row then could only end, and answered "o"
    with finish_reason stop, none of the alternatives (and logged the whole grammar). vLLM ends such
    a request with an error; here too, a 400 (the same grammar always fails: a retry cannot help),
    and the requests beside it go on."""
    grammar = engine.compile_grammar(Constraint("grammar", "start: " + " | ".join(f'"opt{i}"' for i in range(2500))))
    bad = engine.prepare([{"role": "user", "content": "pick"}], [], grammar=grammar, max_tokens=20)
    good = [engine.prepare([{"role": "user", "content": f"hello {i}"}], [], max_tokens=8, ignore_eos=True)
            for i in range(2)]
    with engine.paused():  # admitted together: one batch
        handles = [engine.submit(r) for r in [good[0], bad, good[1]]]
    events = list(handles[1])
    assert isinstance(events[-1].error, InvalidRequest), events
    assert "grammar" in events[-1].error.message and "max is 2000" in events[-1].error.message
    assert events[-1].error.status == 400 and not "".join(e.text for e in events)
    for handle in handles[0], handles[2]:
        assert [e.finish_reason for e in handle][-1] == "length"
