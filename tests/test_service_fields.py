"""The rule: every field of the pinned vLLM's ChatCompletionRequest and CompletionRequest is honoured
(a typed field of ours, with a test that shows its effect) or refused with a 400 that names it; never
accepted and ignored. The field lists come from the vllm package the test venv installs
(scripts/setup-test-env.sh: vllm 0.27.0 without its dependencies), so a vLLM upgrade that adds a
field fails here until the field is decided. A typed field is not yet an honoured one: the fields every request reads while it
is served are recorded, so one that no code reads on some route (accepted, then ignored) fails."""
from __future__ import annotations

import contextlib
import importlib

import httpx
import pytest
from pydantic import BaseModel

from service.api import protocol, tokenization
from service.api.completions import CompletionRequest
from service.api.fields import NO_EFFECT, REFUSED
from service.api.protocol import ChatCompletionRequest, SamplingFields
from tests.conftest import API_KEY, SERVED_NAME

SURFACE = "tests.test_service_surface"
STRUCTURED = "tests.test_structured_outputs_api"
TOOLS = "tests.test_tools_api"
API = "tests.test_service_api"
SAMPLING = "tests.test_service_sampling"
ENGINE = "tests.test_service_engine"
PROMPT_LOGPROBS = "tests.test_service_prompt_logprobs"
TRUNCATION = "tests.test_prompt_truncation"
LOGPROB_IDS = "tests.test_logprob_token_ids"
REPETITION = "tests.test_repetition_detection"

# Honoured field -> the test that shows its effect.
CHAT_HONOURED = {
    "messages": f"{API}::test_text_only",
    "model": f"{API}::test_unknown_model_is_404_like_vllm",
    "frequency_penalty": f"{SAMPLING}::test_penalties_reduce_repetition",
    "presence_penalty": f"{SAMPLING}::test_penalties_reduce_repetition",
    "repetition_penalty": f"{SAMPLING}::test_penalties_reduce_repetition",
    "logit_bias": f"{SURFACE}::test_sampling_fields_reach_the_engine",
    "logprobs": f"{SURFACE}::test_logprobs_and_top_logprobs_in_openais_shape",
    "top_logprobs": f"{SURFACE}::test_logprobs_and_top_logprobs_in_openais_shape",
    "max_tokens": f"{API}::test_max_tokens_and_max_completion_tokens_give_length",
    "max_completion_tokens": f"{API}::test_max_tokens_and_max_completion_tokens_give_length",
    "n": f"{SURFACE}::test_n_choices_non_streamed_and_streamed",
    "seed": f"{API}::test_seeded_sampling_is_reproducible",
    "stop": f"{API}::test_stop_string_cuts_the_answer",
    "stream": f"{API}::test_stream_equals_non_stream_and_reports_usage",
    "stream_options": f"{SURFACE}::test_continuous_usage_stats_put_the_usage_on_every_chunk",
    "temperature": f"{SAMPLING}::test_min_p_keeps_only_tokens_near_the_likeliest",
    "top_p": f"{ENGINE}::test_sampling_filters_reduce_to_greedy",
    "top_k": f"{ENGINE}::test_sampling_filters_reduce_to_greedy",
    "min_p": f"{SURFACE}::test_sampling_fields_reach_the_engine",
    "stop_token_ids": f"{SURFACE}::test_request_id_token_ids_and_stop_reason",
    "include_stop_str_in_output": f"{SURFACE}::test_stop_strings_and_include_stop_str_in_output",
    "ignore_eos": f"{SURFACE}::test_sampling_fields_reach_the_engine",
    "min_tokens": f"{SURFACE}::test_sampling_fields_reach_the_engine",
    "skip_special_tokens": f"{SURFACE}::test_skip_special_tokens_false_shows_them",
    "allowed_token_ids": f"{SURFACE}::test_sampling_fields_reach_the_engine",
    "bad_words": f"{SURFACE}::test_sampling_fields_reach_the_engine",
    "echo": f"{SURFACE}::test_prompt_fields_change_the_prompt",
    "add_generation_prompt": f"{SURFACE}::test_prompt_fields_change_the_prompt",
    "continue_final_message": f"{SURFACE}::test_prompt_fields_change_the_prompt",
    "add_special_tokens": f"{SURFACE}::test_prompt_fields_change_the_prompt",
    "chat_template_kwargs": f"{SURFACE}::test_prompt_fields_change_the_prompt",
    "return_prompt_text": f"{SURFACE}::test_prompt_fields_change_the_prompt",
    "request_id": f"{SURFACE}::test_request_id_token_ids_and_stop_reason",
    "return_token_ids": f"{SURFACE}::test_request_id_token_ids_and_stop_reason",
    "return_tokens_as_token_ids": f"{SURFACE}::test_logprobs_and_top_logprobs_in_openais_shape",
    "cache_salt": f"{SURFACE}::test_cache_salt_keeps_prefixes_apart",
    "mm_processor_kwargs": f"{SURFACE}::test_mm_processor_kwargs_resize_within_the_servers_limits",
    "stream_interval": f"{SURFACE}::test_stream_interval_sends_chunks_of_that_many_tokens",
    "response_format": f"{STRUCTURED}::test_json_schema_response_format_gives_valid_json",
    "structured_outputs": f"{STRUCTURED}::test_vllm_structured_outputs_are_followed",
    "tools": f"{TOOLS}::test_required_gives_one_or_more_valid_calls",
    "tool_choice": f"{TOOLS}::test_a_named_tool_is_called_once_with_finish_reason_stop",
    "parallel_tool_calls": f"{TOOLS}::test_parallel_tool_calls_false_gives_one_call",
    "prompt_logprobs": f"{PROMPT_LOGPROBS}::test_chat_prompt_logprobs_with_an_image_match_transformers",
    "truncate_prompt_tokens": f"{TRUNCATION}::test_chat_prompts_are_cut_after_the_chat_template",
    "truncation_side": f"{TRUNCATION}::test_chat_prompts_are_cut_after_the_chat_template",
    "logprob_token_ids": f"{LOGPROB_IDS}::test_chat_lists_the_given_ids_logprobs_at_every_position",
    "repetition_detection": f"{REPETITION}::test_chat_ends_where_vllm_detects_the_repetition",
}
COMPLETION_HONOURED = {
    **{name: test for name, test in CHAT_HONOURED.items() if name in CompletionRequest.model_fields},
    "prompt": f"{SURFACE}::test_completions_with_the_openai_sdk",
    "echo": f"{SURFACE}::test_completions_with_the_openai_sdk",
    "max_tokens": f"{SURFACE}::test_completions_with_the_openai_sdk",
    "logprobs": f"{SURFACE}::test_completions_logprobs_in_vllms_shape",
    "n": f"{SURFACE}::test_completions_token_ids_and_usage_where_vllm_puts_them",
    "stream_options": f"{SURFACE}::test_completions_token_ids_and_usage_where_vllm_puts_them",
    "return_token_ids": f"{SURFACE}::test_completions_token_ids_and_usage_where_vllm_puts_them",
    "add_special_tokens": f"{SURFACE}::test_tokenize_a_prompt_and_chat_messages_and_detokenize",
    "response_format": f"{STRUCTURED}::test_completions_take_structured_outputs_too",
    "structured_outputs": f"{STRUCTURED}::test_completions_take_structured_outputs_too",
    "prompt_logprobs": f"{PROMPT_LOGPROBS}::test_completions_prompt_logprobs_over_several_passes_match_transformers",
    "truncate_prompt_tokens": f"{TRUNCATION}::test_completions_run_the_last_or_first_tokens_vllm_keeps",
    "truncation_side": f"{TRUNCATION}::test_completions_run_the_last_or_first_tokens_vllm_keeps",
    "logprob_token_ids": f"{LOGPROB_IDS}::test_completions_give_a_top_logprobs_dict_of_the_given_ids",
    "repetition_detection": f"{REPETITION}::test_completions_end_where_vllm_detects_the_repetition",
}
# A value that is not neutral, for each refused field.
NOT_NEUTRAL = {
    "reasoning_effort": "high", "thinking_token_budget": 10, "include_reasoning": False, "use_beam_search": True,
    "length_penalty": 2.0, "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}", "media_io_kwargs": {"image": {}}, "priority": 1,
    "kv_transfer_params": {"a": 1}, "ec_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1}, "suffix": "x",
    "prompt_embeds": "AAAA",
}


def vllm_fields(module: str, name: str) -> list[str]:
    pytest.importorskip("vllm", reason="the pinned vLLM is installed by scripts/setup-test-env.sh")
    return list(getattr(importlib.import_module(module), name).model_fields)


CHAT = "vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"
COMPLETION = "vllm.entrypoints.openai.completion.protocol", "CompletionRequest"


@pytest.mark.parametrize(("vllm_model", "ours", "honoured"), [(CHAT, ChatCompletionRequest, CHAT_HONOURED),
                                                             (COMPLETION, CompletionRequest, COMPLETION_HONOURED)],
                         ids=["chat", "completions"])
def test_every_vllm_field_is_decided(vllm_model, ours, honoured):
    fields = vllm_fields(*vllm_model)
    undecided = [f for f in fields if f not in honoured and f not in REFUSED and f not in NO_EFFECT]
    assert not undecided, f"vLLM fields neither honoured nor refused: {undecided}"
    for name in honoured:
        assert name in fields, f"{name} is not a vLLM field"
        assert name in ours.model_fields, f"{name} is honoured but not a typed field of {ours.__name__}"
        assert name not in REFUSED and name not in NO_EFFECT


@contextlib.contextmanager
def fields_read(monkeypatch):
    """The fields ("Model.field", "Model.nested.field") that code reads from the requests parsed
    meanwhile; reads by the request's own validators (while it is parsed) do not count."""
    reads: set[str] = set()
    tracked: dict[int, str] = {}
    parsed: list[BaseModel] = []  # kept alive: `tracked` goes by id
    parse = protocol.validate

    def track(model: BaseModel, path: str) -> None:
        tracked[id(model)] = path
        parsed.append(model)
        for name in type(model).model_fields:
            if isinstance(value := object.__getattribute__(model, name), BaseModel):
                track(value, f"{path}.{name}")

    def validate(model, body):
        request = parse(model, body)
        track(request, model.__name__)
        return request

    def recording(self, name):
        path = tracked.get(id(self))
        if path is not None and name in type(self).model_fields:
            reads.add(f"{path}.{name}")
        return object.__getattribute__(self, name)

    for module in (protocol, tokenization):
        monkeypatch.setattr(module, "validate", validate)
    for model in (SamplingFields, protocol.StreamOptions, tokenization._Strict):
        monkeypatch.setattr(model, "__getattribute__", recording, raising=False)
    yield reads


STREAMED = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
SERVED = [  # (route, body): between them, every path on which a request's fields are read
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1,
                              **STREAMED}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1, **STREAMED}),
    ("/tokenize", {"prompt": "hi"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/detokenize", {"tokens": [1, 2]}),
]


def test_every_honoured_field_is_read_while_serving(server, monkeypatch):
    with fields_read(monkeypatch) as reads:
        for path, body in SERVED:
            response = httpx.post(server.base_url + path, json={"model": SERVED_NAME, "max_tokens": 2, **body},
                                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            assert response.status_code == 200, (path, response.text)
    stream_options = [f"stream_options.{name}" for name in vllm_fields("vllm.entrypoints.openai.engine.protocol",
                                                                        "StreamOptions")]
    for ours, honoured in ((ChatCompletionRequest, CHAT_HONOURED), (CompletionRequest, COMPLETION_HONOURED)):
        unread = [name for name in [*honoured, *stream_options] if f"{ours.__name__}.{name}" not in reads]
        assert not unread, f"{ours.__name__}: honoured but never read: {unread}"
    for name in ("TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"):
        fields = [f for f in vllm_fields(TOKENIZE, name) if f not in REFUSED]
        unread = [f for f in fields if f"{name}.{f}" not in reads]
        assert not unread, f"{name}: honoured but never read: {unread}"


TOKENIZE = "vllm.entrypoints.serve.tokenize.protocol"
TOKENIZE_TEST = f"{SURFACE}::test_tokenize_a_prompt_and_chat_messages_and_detokenize"


@pytest.mark.parametrize("name", ["TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"])
def test_every_vllm_tokenize_field_is_decided(name):
    from service.api import tokenization

    ours = getattr(tokenization, name)
    for field in vllm_fields(TOKENIZE, name):
        assert field in ours.model_fields or field in REFUSED, (name, field)


def test_tokenize_refuses_what_it_does_not_honour(server):
    for field in ("chat_template", "media_io_kwargs"):
        value = NOT_NEUTRAL[field]
        response = httpx.post(server.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                                   field: value},
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


@pytest.mark.parametrize("name", sorted(set(CHAT_HONOURED.values()) | set(COMPLETION_HONOURED.values())
                                        | {TOKENIZE_TEST}))
def test_each_honoured_field_has_a_test_that_shows_its_effect(name):
    module, function = name.split("::")
    assert callable(getattr(importlib.import_module(module), function, None)), name


def _post(server, path: str, fields: dict) -> httpx.Response:
    body = {"model": SERVED_NAME, "max_tokens": 2, **fields}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path.endswith("chat/completions")
                else {"prompt": "hi"})
    return httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.mark.parametrize(("path", "vllm_model"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)],
                         ids=["chat", "completions"])
def test_refused_fields_get_a_400_that_names_them(server, path, vllm_model):
    refused = [f for f in vllm_fields(*vllm_model) if f in REFUSED]
    assert refused
    for name in refused:
        response = _post(server, path, {name: NOT_NEUTRAL[name]})
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert error["param"] == name or name in error["message"], (name, error)
        neutral = REFUSED[name][0][0]
        if neutral is not None:
            assert _post(server, path, {name: neutral}).status_code == 200, name  # the neutral value passes


@pytest.mark.parametrize(("path", "vllm_model"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)],
                         ids=["chat", "completions"])
def test_fields_without_an_effect_in_vllm_are_accepted(server, path, vllm_model):
    values = {"user": "someone", "spaces_between_special_tokens": False, "return_token_offsets": True,
              "return_assistant_tokens_mask": True}
    for name in [f for f in vllm_fields(*vllm_model) if f in NO_EFFECT]:
        assert _post(server, path, {name: values[name]}).status_code == 200, name
