"""vLLM's logprob_token_ids on the real server, through the openai SDK: at every generated position
the logprobs of the given token ids in place of the top ones, rendered as vLLM renders them (chat:
all of them in top_logprobs, the sampled token first, then the ids in their order, each once;
completions: the same as a top_logprobs dict), streamed and not; its requirements and refusals in
the pinned vLLM's words. And the engine's gather over a step whose rows want the top ones, given
ids, or nothing."""
from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest
import torch

from service.engine.logits import StepLogprobs
from tests.conftest import SERVED_NAME

MESSAGES = [{"role": "user", "content": "Tell me about the street."}]
AS_IDS = {"return_tokens_as_token_ids": True}  # tokens named "token_id:<id>": the test reads ids


def token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))


def vllm_error(build) -> str:
    """The message (with its parameter and value) of the VLLMValidationError `build` raises."""
    with pytest.raises(Exception) as info:
        build()
    assert type(info.value).__name__ == "VLLMValidationError", info.value
    return str(info.value)


def chosen_ids(wide: list[dict[int, float]], sampled: list[int], vocab: int) -> list[int]:
    """Ids to ask for: two of the first position's top ones, its sampled token again (vLLM lists it
    once), and one that is in no position's top 20."""
    ranked = list(wide[0])
    everywhere = set().union(*wide)
    outside = next(t for t in reversed(range(vocab)) if t not in everywhere)
    return [ranked[3], ranked[10], sampled[0], outside, ranked[3]]


def check_positions(shown: list[list[tuple[int, float]]], sampled: list[int], sampled_logprobs: list[float],
                    wide: list[dict[int, float]], ids: list[int]) -> None:
    """Each position lists the sampled token, then the ids (each once), with the logprobs the top-20
    request reported for them (one outside the top 20 is below all of those)."""
    assert len(shown) == len(sampled) == len(wide)
    for position, token, logprob, ranked in zip(shown, sampled, sampled_logprobs, wide):
        assert [t for t, _ in position] == list(dict.fromkeys([token, *ids]))
        assert position[0][1] == pytest.approx(logprob) == pytest.approx(ranked[token], abs=1e-4)
        for t, value in position:
            if t in ranked:
                assert value == pytest.approx(ranked[t], abs=1e-4)
            else:
                assert value <= min(ranked.values())


def test_chat_lists_the_given_ids_logprobs_at_every_position(server):
    client = server.client()
    reply = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=20, extra_body=AS_IDS)
    content = reply.choices[0].logprobs.content
    wide = [{token_id(t.token): t.logprob for t in c.top_logprobs} for c in content]
    sampled = [token_id(c.token) for c in content]
    ids = chosen_ids(wide, sampled, server.engine.prompts.vocab_size)
    # top_logprobs is set too: the ids take the top ones' place, as on vLLM.
    fields = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
              "top_logprobs": 2, "extra_body": {**AS_IDS, "logprob_token_ids": ids}}
    listed = client.chat.completions.create(**fields).choices[0].logprobs.content
    assert [token_id(c.token) for c in listed] == sampled  # greedy: the same answer
    check_positions([[(token_id(t.token), t.logprob) for t in c.top_logprobs] for c in listed], sampled,
                    [c.logprob for c in listed], wide, ids)
    streamed = [c for chunk in client.chat.completions.create(**fields, stream=True) if chunk.choices
                and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in listed]


def test_completions_give_a_top_logprobs_dict_of_the_given_ids(server):
    client = server.client()
    fields = {"model": SERVED_NAME, "prompt": "Tell me about", "max_tokens": 6, "temperature": 0}
    wide_reply = client.completions.create(**fields, logprobs=20, extra_body=AS_IDS).choices[0].logprobs
    wide = [{token_id(t): lp for t, lp in top.items()} for top in wide_reply.top_logprobs]
    sampled = [token_id(t) for t in wide_reply.tokens]
    ids = chosen_ids(wide, sampled, server.engine.prompts.vocab_size)
    for stream in (False, True):
        asked = dict(fields, logprobs=0, extra_body={**AS_IDS, "logprob_token_ids": ids})
        if stream:
            parts = [c.choices[0].logprobs for c in client.completions.create(**asked, stream=True)
                     if c.choices and c.choices[0].logprobs]
            tokens = [t for p in parts for t in p.tokens]
            tops = [top for p in parts for top in p.top_logprobs]
            token_logprobs = [lp for p in parts for lp in p.token_logprobs]
        else:
            logprobs = client.completions.create(**asked).choices[0].logprobs
            tokens, tops, token_logprobs = logprobs.tokens, logprobs.top_logprobs, logprobs.token_logprobs
        assert [token_id(t) for t in tokens] == sampled
        check_positions([[(token_id(t), lp) for t, lp in top.items()] for top in tops], sampled, token_logprobs,
                        wide, ids)


def test_the_refusals_are_vllms(server):
    """vLLM's request rules (its own request models give the expected words) and its sampling
    params' (the length and the vocabulary)."""
    chat_protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    completion_protocol = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    sampling = pytest.importorskip("vllm.sampling_params")
    client = server.client()
    vocab = server.engine.prompts.vocab_size
    chat_bodies = [{"logprob_token_ids": [1]}, {"logprob_token_ids": [1], "logprobs": True, "use_beam_search": True}]
    completion_bodies = [{"logprob_token_ids": [1]}, {"logprob_token_ids": [1], "logprobs": 1, "use_beam_search": True},
                         {"logprob_token_ids": [1], "logprobs": 1, "echo": True, "max_tokens": 0}]
    cases = [(client.chat.completions.create, {"messages": MESSAGES}, chat_protocol.ChatCompletionRequest, body)
             for body in chat_bodies]
    cases += [(client.completions.create, {"prompt": "hi"}, completion_protocol.CompletionRequest, body)
              for body in completion_bodies]
    for create, base, vllm_model, body in cases:
        expected = vllm_error(lambda: vllm_model.model_validate({"model": SERVED_NAME, **base, **body}))
        with pytest.raises(openai.BadRequestError) as info:
            create(model=SERVED_NAME, **base, extra_body=body)
        assert info.value.body["message"] == expected and info.value.body["param"] == "logprob_token_ids"
    model_config = SimpleNamespace(max_logprobs=20, get_vocab_size=lambda: vocab)
    for ids in ([5, vocab, -1, vocab + 7], list(range(129))):
        expected = vllm_error(lambda: sampling.SamplingParams(logprob_token_ids=ids)._validate_logprobs(model_config))
        for create, base in ((client.chat.completions.create, {"messages": MESSAGES, "logprobs": True}),
                             (client.completions.create, {"prompt": "hi", "logprobs": 0})):
            with pytest.raises(openai.BadRequestError) as info:
                create(model=SERVED_NAME, max_tokens=2, **base, extra_body={"logprob_token_ids": ids})
            assert info.value.body["message"] == expected and info.value.body["param"] == "logprob_token_ids"
    # An empty list is no list (vLLM's `or None`): the top ones as asked.
    reply = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=2, logprobs=True,
                                           top_logprobs=2, extra_body={"logprob_token_ids": []})
    assert all(len(c.top_logprobs) == 2 for c in reply.choices[0].logprobs.content)


def test_one_step_gathers_each_rows_own_logprobs():
    """Rows of one step that want the top k, given ids (padded to the longest list) or nothing."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([3, 0, 9, 7])
    wanted = [2, (5, 1, 5), None, (7,)]
    step = StepLogprobs.gather(logits, wanted, tokens)
    step.to_host()
    entries = step.entries(tokens.tolist())
    reference = torch.log_softmax(logits, dim=-1)
    assert entries[2] is None
    top = torch.topk(reference[0], 2)
    assert [t for t, _ in entries[0].top] == top.indices.tolist() and not entries[0].requested
    for row, ids in ((1, (5, 1, 5)), (3, (7,))):
        entry = entries[row]
        assert entry.requested and [t for t, _ in entry.top] == list(ids)
        assert [v for _, v in entry.top] == pytest.approx([reference[row, t].item() for t in ids])
        assert entry.logprob == pytest.approx(reference[row, tokens[row]].item())
