"""Which request fields of vLLM's OpenAI server this server honours, and which it refuses by name.

vLLM's ChatCompletionRequest and CompletionRequest accept many fields; each one here is either a
typed field of our request models (honoured: service/api/protocol.py, completions.py) or listed
below: refused with a 400 that names it whenever it is set to anything but vLLM's neutral value,
never accepted and ignored. tests/test_service_fields.py reads the pinned vLLM's models and keeps
the lists complete.
"""
from __future__ import annotations

from typing import Any

from service.errors import InvalidRequest

# field -> (its neutral values, why it is refused)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "reasoning_effort": ((None,), "this server has no reasoning parser"),
    "thinking_token_budget": ((None,), "this server has no reasoning parser"),
    "include_reasoning": ((True, None), "this server has no reasoning parser"),
    "use_beam_search": ((False, None), "beam search is not supported"),
    "length_penalty": ((1.0, None), "it applies to beam search, which is not supported"),
    "documents": ((None,), "the Qwen3-VL chat template takes no documents"),
    "chat_template": ((None,), "a request's own chat template is not trusted (vLLM refuses it too without "
                               "--trust-request-chat-template)"),
    "media_io_kwargs": ((None,), "media loading takes no per-request options"),
    "priority": ((0, None), "requests are served in order (no priority scheduling)"),
    "kv_transfer_params": ((None,), "disaggregated serving is not supported"),
    "ec_transfer_params": ((None,), "disaggregated serving is not supported"),
    "vllm_xargs": ((None,), "there are no custom extensions"),
    "suffix": ((None,), "suffixes are not supported (vLLM refuses them too)"),
    "prompt_embeds": ((None,), "prompt embeddings are not accepted"),
}

# Accepted without an effect, as vLLM accepts them: field -> why nothing changes.
NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for the caller's records; vLLM ignores it too",
    "spaces_between_special_tokens": "fast (byte-level) tokenizers decode the same either way, in vLLM too",
    "return_token_offsets": "vLLM honours it only on its /render endpoints",
    "return_assistant_tokens_mask": "vLLM honours it only on its /render endpoints",
}


def check_refused(fields: dict[str, Any]) -> None:
    """InvalidRequest naming the first refused field set to a value that is not neutral."""
    for name, value in fields.items():
        entry = REFUSED.get(name)
        if entry is not None and not any(_same(value, neutral) for neutral in entry[0]):
            raise InvalidRequest(f"{name} is not supported by this server: {entry[1]}.", param=name,
                                 kind="unsupported")


def _same(value: Any, neutral: Any) -> bool:
    """Equal, and not by Python's True == 1."""
    return value is neutral or (value == neutral and isinstance(value, bool) == isinstance(neutral, bool))
