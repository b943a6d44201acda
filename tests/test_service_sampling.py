"""The engine's sampling surface, as vLLM's sampler defines it: each parameter shown by its effect on
the tiny model's real output, the processors against vLLM's formulas, n choices forked from one
prefill, and rows with state that cost or change nothing for the rows beside them."""
from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import torch

from service.engine import Engine
from service.engine.logits import LogitsProcessors, RowLogits
from service.engine.sampling import SamplingParams
from service.errors import InvalidRequest
from tests.conftest import running_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    yield from running_engine(tiny_model_dir, max_model_len=256, max_batch_size=4, max_queue=16)


def prepare(engine, text="Tell me a story about the street.", **kwargs):
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0.0)
    return engine.prepare([{"role": "user", "content": [{"type": "text", "text": text}]}], [], **kwargs)


def run(engine, request):
    handle = engine.submit(request)
    return handle, list(handle)


def greedy(engine, **kwargs) -> list[int]:
    return run(engine, prepare(engine, **kwargs))[0].token_ids


# ---- each parameter by its effect ------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens_and_is_clamped(engine):
    base = greedy(engine)
    assert run(engine, prepare(engine, logit_bias={base[0]: -100}))[0].token_ids[0] != base[0]
    assert set(greedy(engine, logit_bias={77: 100})) == {77}
    clamped = prepare(engine, logit_bias={77: 1e6})
    assert clamped.params.logit_bias == ((77, 100.0),)  # vLLM clamps to [-100, 100]


def test_allowed_token_ids_only_those_are_generated(engine):
    assert set(greedy(engine, allowed_token_ids=[5, 9], max_tokens=24)) <= {5, 9}


def _stable_pair(engine, ids: list[int]) -> int:
    """A position whose two tokens decode to a text that tokenizes back to them."""
    tok = engine.tokenizer
    for i in range(1, len(ids) - 1):
        text = tok.decode(ids[i:i + 2])
        if tok.encode(text.lstrip(), add_special_tokens=False) == ids[i:i + 2] and not text.startswith(" "):
            return i
    pytest.skip("no stable token pair in this output")


def test_bad_words_ban_a_word_once_its_prefix_was_generated(engine):
    base = greedy(engine, max_tokens=24)
    i = _stable_pair(engine, base)
    word = engine.tokenizer.decode(base[i:i + 2])
    banned = greedy(engine, max_tokens=24, bad_words=(word,))
    assert banned[:i + 1] == base[:i + 1]  # the word's first token is allowed...
    assert banned[i + 1] != base[i + 1]  # ...its last is not, right after it
    pairs = set(zip(banned, banned[1:]))
    assert (base[i], base[i + 1]) not in pairs
    single = greedy(engine, max_tokens=24, bad_words=(engine.tokenizer.decode([base[0]]),))
    assert base[0] not in single


def test_stop_token_ids_end_the_answer_and_name_the_token(engine):
    base = greedy(engine)
    stop = base[3]
    handle, events = run(engine, prepare(engine, stop_token_ids=[stop]))
    first = base.index(stop)
    assert handle.token_ids == base[:first + 1]
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop
    text = "".join(e.text for e in events)
    assert text == engine.tokenizer.decode(base[:first])  # the stop token's text is left out...
    _, kept = run(engine, prepare(engine, stop_token_ids=[stop], include_stop_str_in_output=True))
    assert "".join(e.text for e in kept) == engine.tokenizer.decode(base[:first + 1])  # ...unless asked


def test_stop_strings_with_include_stop_str_in_output(engine):
    _, events = run(engine, prepare(engine, max_tokens=32))
    full = "".join(e.text for e in events)
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip())
    _, cut = run(engine, prepare(engine, max_tokens=32, stop=[stop]))
    _, kept = run(engine, prepare(engine, max_tokens=32, stop=[stop], include_stop_str_in_output=True))
    end = full.index(stop)
    assert "".join(e.text for e in cut) == full[:end]
    assert "".join(e.text for e in kept) == full[:end + len(stop)]
    assert cut[-1].stop_reason == stop and kept[-1].finish_reason == "stop"


def test_min_tokens_masks_eos_until_reached(engine):
    eos = min(engine._eos_ids())
    at_once, _ = run(engine, prepare(engine, logit_bias={eos: 100}))
    assert at_once.token_ids == [eos]
    held, events = run(engine, prepare(engine, logit_bias={eos: 100}, min_tokens=5))
    assert len(held.token_ids) == 6 and held.token_ids[-1] == eos and eos not in held.token_ids[:5]
    assert events[-1].finish_reason == "stop"


def test_penalties_reduce_repetition(engine):
    def most_repeated(**kwargs) -> int:
        return Counter(greedy(engine, max_tokens=60, **kwargs)).most_common(1)[0][1]

    plain = most_repeated()
    assert plain > 1
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        assert most_repeated(**penalty) < plain, penalty


def test_min_p_keeps_only_tokens_near_the_likeliest(engine):
    sampled = [greedy(engine, temperature=2.0, min_p=1.0, seed=s, max_tokens=12) for s in range(3)]
    assert sampled[0] == sampled[1] == sampled[2] == greedy(engine, max_tokens=12)  # min_p 1: only the top token


def test_logprobs_are_the_raw_log_softmax_with_the_top_alternatives(engine):
    handle, events = run(engine, prepare(engine, logprobs=3, max_tokens=8))
    entries = [e for ev in events for e in ev.logprobs]
    assert [e.token_id for e in entries] == handle.token_ids
    for entry in entries:
        assert len(entry.top) == 3 and entry.top[0][0] == entry.token_id  # greedy: the top one
        assert entry.top[0][1] == pytest.approx(entry.logprob)
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.logprob <= 0
    _, none = run(engine, prepare(engine, max_tokens=4))
    assert all(ev.logprobs is None for ev in none)
    _, only = run(engine, prepare(engine, logprobs=0, max_tokens=4))
    assert all(e.top == [] for ev in only for e in ev.logprobs)


def test_n_choices_share_one_prefill_and_each_is_the_request_with_seed_plus_index(engine):
    """vLLM's n: choice i samples with seed + i; here the choices fork the first one's prefilled slot."""
    handle, events = run(engine, prepare(engine, n=3, temperature=1.0, seed=11))
    alone = [greedy(engine, temperature=1.0, seed=11 + i) for i in range(3)]
    assert handle.choice_token_ids == alone
    assert len({tuple(c) for c in alone}) == 3
    assert sorted({e.index for e in events}) == [0, 1, 2]
    assert sum(e.finish_reason is not None for e in events) == 3
    cache = engine.scheduler.batch.cache
    deadline = time.monotonic() + 5  # the last slot is freed just after its final event is delivered
    while cache.free_slots < cache.num_slots and time.monotonic() < deadline:
        time.sleep(0.005)
    assert cache.free_slots == cache.num_slots and cache.free_blocks == cache.num_blocks  # every fork gave back


def test_n_above_the_batch_or_with_greedy_is_refused(engine):
    with pytest.raises(InvalidRequest, match="at most 4"):
        prepare(engine, n=5, temperature=1.0)
    with pytest.raises(InvalidRequest, match="greedy"):
        prepare(engine, n=2, temperature=0.0)


def test_seed_is_validated_as_vllm_does(engine):
    with pytest.raises(InvalidRequest) as info:
        prepare(engine, seed=2**64, temperature=1.0)
    assert info.value.param == "seed"
    assert prepare(engine, seed=-(2**63), temperature=1.0).params.seed == -(2**63)


def test_generation_config_defaults_as_vllm_reads_them(engine):
    params = prepare(engine, temperature=None, max_tokens=None).params
    # The tiny checkpoint's generation_config: temperature 0.7, top_p 0.8, top_k 20 (Qwen3-VL Instruct's).
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, 20)
    assert params.max_tokens == engine.max_model_len - prepare(engine).prompt_tokens  # the rest of the context


def test_a_row_with_processors_leaves_its_neighbours_output_unchanged(engine):
    plain = [prepare(engine, text=f"question {i}", max_tokens=20) for i in range(3)]
    alone = [run(engine, r)[0].token_ids for r in plain]
    with engine.paused():
        odd = engine.submit(prepare(engine, presence_penalty=2.0, logit_bias={77: 5}, bad_words=("ab",),
                                    min_tokens=3, logprobs=2, max_tokens=20))
        handles = [engine.submit(r) for r in plain]
    list(odd)
    assert [list(h) and h.token_ids for h in handles] == alone


def test_one_request_failing_at_admission_fails_only_itself(engine):
    """Whatever fails while one request is started (here its processors' state, given an id past
    the vocabulary that Engine.prepare would have refused) is its error alone."""
    good = [prepare(engine, text=f"fine {i}", max_tokens=6) for i in range(2)]
    bad = prepare(engine, logit_bias={5: 1.0})
    object.__setattr__(bad.params, "logit_bias", ((10**6, 1.0),))
    with engine.paused():
        handles = [engine.submit(good[0]), engine.submit(bad), engine.submit(good[1])]
    outcomes = [list(h)[-1] for h in handles]
    assert outcomes[1].error is not None
    assert [o.finish_reason for o in (outcomes[0], outcomes[2])] == ["length", "length"]


# ---- the processors against vLLM's formulas ------------------------------------------------------


def test_penalties_match_vllms_formula():
    vocab = 12
    params = SamplingParams(8, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    prompt = torch.tensor([1, 2])
    state = RowLogits(params, prompt, frozenset(), vocab, torch.device("cpu"))
    for token in (2, 3, 3):
        state.record(torch.tensor([token]))
    logits = torch.linspace(-3, 3, vocab)[None]
    out = LogitsProcessors([state], [3]).apply(logits)[0]
    counts = Counter([2, 3, 3])
    for t in range(vocab):
        x = logits[0, t].item()
        if t in (1, 2) or counts[t]:  # repetition: prompt and output
            x = x / 2.0 if x > 0 else x * 2.0
        x -= 0.25 * counts[t] + 0.5 * (counts[t] > 0)  # frequency and presence: output only
        assert out[t].item() == pytest.approx(x, abs=1e-6), t
    assert torch.equal(logits, torch.linspace(-3, 3, vocab)[None])  # the raw logits are left as they were


def test_min_tokens_masks_every_stop_token_only_before_the_minimum():
    params = SamplingParams(8, min_tokens=2, stop_token_ids=(4,))
    state = RowLogits(params, torch.tensor([0]), frozenset({7}), 10, torch.device("cpu"))
    logits = torch.zeros(1, 10)
    masked = LogitsProcessors([state], [1]).apply(logits)[0]
    assert math.isinf(masked[4]) and math.isinf(masked[7]) and masked[5] == 0
    assert torch.equal(LogitsProcessors([state], [2]).apply(logits), logits)


def test_no_processor_is_built_for_rows_that_need_none():
    assert not RowLogits.needed(SamplingParams(8, temperature=0.7, top_p=0.9, logprobs=3))
    assert LogitsProcessors.for_rows([None, None], [0, 0]) is None


def test_cancelling_a_request_of_n_choices_frees_every_row(engine):
    handle = engine.submit(prepare(engine, n=3, temperature=1.0, max_tokens=200, ignore_eos=True))
    while min(len(ids) for ids in handle.choice_token_ids) < 3:
        time.sleep(0.001)
    handle.cancel()
    assert list(handle)[-1].error is not None
    cache = engine.scheduler.batch.cache
    deadline = time.monotonic() + 5
    while (engine.running or cache.free_slots < cache.num_slots) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.running == 0 and cache.free_slots == cache.num_slots and cache.free_blocks == cache.num_blocks
    assert max(len(ids) for ids in handle.choice_token_ids) < 200


def test_cancelling_a_request_of_n_choices_while_queued_or_prefilling_frees_its_held_room(engine):
    with engine.paused():
        handle = engine.submit(prepare(engine, text="a long question, " * 8, n=2, temperature=1.0, max_tokens=50))
        handle.cancel()
    assert list(handle)[-1].error is not None
    every_row = engine.submit(prepare(engine, n=4, temperature=1.0, max_tokens=4))  # needs all the batch's rows
    events = list(every_row)
    assert sum(e.finish_reason == "length" for e in events) == 4  # nothing of the cancelled one was still held


def test_n_choices_of_an_image_prompt_and_of_one_from_the_prefix_cache(engine):
    from PIL import Image

    image = Image.linear_gradient("L").resize((96, 64)).convert("RGB")

    def with_image(**kwargs):
        content = [{"type": "image"}, {"type": "text", "text": "Describe the image in some detail please, " * 3}]
        return engine.prepare([{"role": "user", "content": content}], [image], max_tokens=16, **kwargs)

    assert with_image().prompt_tokens > 64  # a full block before the last, partly filled one
    alone = [run(engine, with_image(temperature=1.0, seed=3 + i))[0].token_ids for i in range(3)]
    for _ in range(2):  # the second time its full blocks come from the prefix cache
        assert run(engine, with_image(n=3, temperature=1.0, seed=3))[0].choice_token_ids == alone
