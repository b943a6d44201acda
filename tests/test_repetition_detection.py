"""vLLM's repetition_detection on the real server, through the openai SDK: the generation ends, with
finish_reason "repetition" and stop_reason "repetition_detected", at the first token (from
min_tokens on) where the pinned vLLM's own check_sequence_repetition finds the output ending in a
pattern repeated min_count times; chat and completions, streamed and not; vLLM's validation words;
and the engine's incremental detector against vLLM's check on many random outputs."""
from __future__ import annotations

import ast
import importlib.util
import random
from pathlib import Path

import openai
import pytest

from service.engine.stops import RepetitionDetectionParams, RepetitionDetector
from tests.conftest import SERVED_NAME
from tests.test_service_api import metric

MAX_TOKENS = 48
FEW = {"allowed_token_ids": [100, 101, 102], "ignore_eos": True}  # the tiny model's greedy answer then repeats itself


@pytest.fixture(scope="module")
def vllm_check():
    """vLLM's check_sequence_repetition and its params, the function taken from its module's source
    (importing the module imports vLLM's scheduler, which needs vLLM's whole dependency tree)."""
    sampling = pytest.importorskip("vllm.sampling_params")
    source = Path(importlib.util.find_spec("vllm.v1.core.sched").origin).with_name("utils.py").read_text()
    namespace = {"Sequence": list, "RepetitionDetectionParams": sampling.RepetitionDetectionParams}
    wanted = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
              and node.name in ("_has_repeating_pattern", "check_sequence_repetition")]
    exec(compile(ast.Module(wanted, type_ignores=[]), "vllm/v1/core/sched/utils.py", "exec"), namespace)
    return namespace["check_sequence_repetition"], sampling.RepetitionDetectionParams


def first_stop(vllm_check, tokens: list[int], fields: dict, min_tokens: int = 0) -> int | None:
    """How many tokens vLLM generates before its scheduler's check_stop ends the request for a
    repetition (max_tokens, checked before it, ends it at MAX_TOKENS)."""
    check, params = vllm_check
    for count in range(max(min_tokens, 1), MAX_TOKENS):
        if check(tokens[:count], params(**fields)):
            return count
    return None


def test_completions_end_where_vllm_detects_the_repetition(server, vllm_check):
    client = server.client()
    fields = {"model": SERVED_NAME, "prompt": "Tell me about", "temperature": 0}
    plain = client.completions.create(**fields, max_tokens=MAX_TOKENS, extra_body={**FEW, "return_token_ids": True})
    tokens = plain.choices[0].token_ids
    detection = {"max_pattern_size": 3, "min_pattern_size": 2, "min_count": 3}
    for min_tokens in (0, 12):
        count = first_stop(vllm_check, tokens, detection, min_tokens)
        assert count is not None and count >= min_tokens
        extra = {**FEW, "return_token_ids": True, "min_tokens": min_tokens,
                 "repetition_detection": detection}
        before = metric(server, "vllm:request_success_total", finished_reason="repetition")
        reply = client.completions.create(**fields, max_tokens=MAX_TOKENS, extra_body=extra)
        choice = reply.choices[0]
        assert (choice.finish_reason, choice.stop_reason) == ("repetition", "repetition_detected")
        assert choice.token_ids == tokens[:count] and reply.usage.completion_tokens == count
        assert choice.text == client.completions.create(**fields, max_tokens=count, extra_body=FEW).choices[0].text
        assert metric(server, "vllm:request_success_total", finished_reason="repetition") == before + 1
        chunks = list(client.completions.create(**fields, max_tokens=MAX_TOKENS, extra_body=extra, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == choice.text
        assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].stop_reason) == \
            ("repetition", "repetition_detected")


def test_chat_ends_where_vllm_detects_the_repetition(server, vllm_check):
    client = server.client()
    fields = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Tell me about"}], "temperature": 0,
              "max_tokens": MAX_TOKENS}
    extra = {**FEW, "return_token_ids": True}
    tokens = client.chat.completions.create(**fields, extra_body=extra).choices[0].token_ids
    detection = {"max_pattern_size": 4, "min_count": 5}  # min_pattern_size 0: from 1 token on
    count = first_stop(vllm_check, tokens, detection)
    assert count is not None
    reply = client.chat.completions.create(**fields, extra_body={**extra, "repetition_detection": detection})
    choice = reply.choices[0]
    assert (choice.finish_reason, choice.stop_reason) == ("repetition", "repetition_detected")
    assert choice.token_ids == tokens[:count]
    chunks = list(client.chat.completions.create(**fields, stream=True,
                                                 extra_body={**extra, "repetition_detection": detection}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].stop_reason) == \
        ("repetition", "repetition_detected")
    off = client.chat.completions.create(**fields, extra_body={**extra, "repetition_detection": {"max_pattern_size": 0}})
    assert off.choices[0].finish_reason == "length"  # max_pattern_size 0 (vLLM's default): off


def test_invalid_parameters_get_vllms_words(server):
    chat_protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    client = server.client()
    messages = [{"role": "user", "content": "hi"}]
    for detection in ({"max_pattern_size": -1}, {"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2},
                      {"max_pattern_size": 3, "min_count": 1}, {"max_pattern_size": 3}):
        with pytest.raises(Exception) as vllm:
            chat_protocol.ChatCompletionRequest.model_validate({"messages": messages, "repetition_detection": detection})
        assert type(vllm.value).__name__ == "VLLMValidationError"
        for create, base in ((client.chat.completions.create, {"messages": messages}),
                             (client.completions.create, {"prompt": "hi"})):
            with pytest.raises(openai.BadRequestError) as info:
                create(model=SERVED_NAME, max_tokens=2, **base, extra_body={"repetition_detection": detection})
            assert info.value.body["message"] == str(vllm.value) and info.value.body["type"] == "BadRequestError"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2,
                                       extra_body={"repetition_detection": {"max_pattern_size": "many"}})
    assert info.value.body["param"] == "body.repetition_detection.max_pattern_size"


def test_the_incremental_detector_agrees_with_vllms_check(vllm_check):
    check, params = vllm_check
    rng = random.Random(0)
    detected = 0
    for _ in range(2000):
        largest = rng.randint(1, 8)
        detection = {"max_pattern_size": largest, "min_pattern_size": rng.randint(0, largest),
                     "min_count": rng.randint(2, 4)}
        length = rng.randint(1, 40)
        detector = RepetitionDetector(RepetitionDetectionParams(**detection), length)
        tokens: list[int] = []
        for _ in range(length):
            # Half the tokens repeat an earlier one: patterns come often.
            tokens.append(rng.choice(tokens) if tokens and rng.random() < 0.5 else rng.randint(1, 3))
            found = detector.add(tokens[-1])
            assert found == check(tokens, params(**detection)), (detection, tokens)
            detected += found
    assert detected > 100
