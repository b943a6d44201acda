"""What a plan aims for, whichever profile: the image sizes it steps down through, the images a
request may hold, and the shortest context worth serving."""
from __future__ import annotations

from service.settings import ServiceSettings

from .model_facts import max_image_tokens
from .models import ModelSpec

_DEFAULTS = ServiceSettings.model_fields
DEFAULT_MAX_PIXELS = _DEFAULTS["max_pixels"].default            # ~1000 image tokens
PIXEL_STEPS = tuple(p for p in (DEFAULT_MAX_PIXELS, 802_816, 602_112, 401_408, 200_704)
                    if p <= DEFAULT_MAX_PIXELS)
# The answer a useful context leaves room for. Not the service's default max_tokens: that is the rest
# of the context (as vLLM), unless VLKIT_MAX_TOKENS_DEFAULT caps it.
ANSWER_TOKENS = 512
PROMPT_TOKENS = 256                # the text of a prompt beside its image
IMAGE_LIMIT = 4                    # images per request (both profiles), fewer where the context is short
# Requests decoded at once, both profiles: at least this many (8 rows of logits cost ~40 MiB), more
# where the KV cache holds more typical requests (min_useful_context each).
MIN_BATCH = 8


def min_useful_context(spec: ModelSpec, max_pixels: int) -> int:
    """One image at max_pixels, a prompt and a default-length answer: the shortest context worth
    serving, and the typical request a batch size is counted in."""
    return max_image_tokens(spec, max_pixels) + PROMPT_TOKENS + ANSWER_TOKENS


def round_context(tokens: int) -> int:
    """Down to a multiple of 256 (of 16 under 512 tokens): contexts a person would pick."""
    return tokens // 256 * 256 if tokens >= 512 else tokens // 16 * 16
