"""Chat messages and images -> a validated request: chat template, image processor, positions.

CPU work that touches no weights, so it runs on any thread (the HTTP layer runs it off the event
loop) while the scheduler thread keeps the device busy. The rules of what a request may be (how
many images, how long a prompt and its answer) are checked here, once.
"""
from __future__ import annotations

from typing import Any

import torch

from service.decode.cache import image_digest, prompt_block_hashes
from service.engine.loading import image_kwargs
from service.engine.requests import GenerationRequest, Prompt
from service.engine.sampling import SamplingParams
from service.errors import InvalidRequest
from service.settings import ServiceSettings
from service.sizing import images_in_largest_request


class PromptBuilder:
    def __init__(self, model: Any, processor: Any, settings: ServiceSettings, max_model_len: int):
        self.processor = processor
        self.settings = settings
        self.max_model_len = max_model_len
        self.image_token_id = model.config.image_token_id
        self._get_rope_index = model.model.get_rope_index
        self._image_kwargs = image_kwargs(processor, settings)
        self._takes_images = settings.max_images_per_request > 0 and hasattr(processor, "image_processor")
        self.sampling_defaults = _sampling_defaults(getattr(model, "generation_config", None))

    def check_image_count(self, count: int) -> None:
        """InvalidRequest when a request brings more images than the settings admit (callers may
        check before decoding them; `request` checks again)."""
        limit = self.settings.max_images_per_request
        if count > limit:
            raise InvalidRequest(f"At most {limit} image(s) may be provided in one request; got {count}.",
                                 param="messages", kind="too_many_images")

    def request(self, messages: list[dict], images: list, *, max_tokens: int | None = None,
                **sampling: Any) -> GenerationRequest:
        """A request the engine can run, or InvalidRequest. ``sampling``: SamplingParams fields; those
        left None take the model's generation_config defaults, as vLLM does."""
        self.check_image_count(len(images))
        prompt = self.build(messages, images)
        length = prompt.length
        if length >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{length} input tokens (text and images). Please reduce the length of the messages or images.",
                param="messages", kind="prompt_too_long")
        if max_tokens is None:
            max_tokens = min(self.settings.max_tokens_default, self.max_model_len - length)
        elif length + max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{length + max_tokens} tokens ({length} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens", kind="prompt_too_long")
        given = {k: v for k, v in sampling.items() if v is not None}
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        params = SamplingParams(max_tokens=max_tokens, **{**self.sampling_defaults, **given})
        return GenerationRequest(prompt=prompt, params=params)

    def build(self, messages: list[dict], images: list) -> Prompt:
        """Chat template + processor + positions + prefix-cache hashes; InvalidRequest when the
        processor refuses the input."""
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt",
                                    **(self._image_kwargs if images else {}))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(f"cannot build the prompt: {exc}", param="messages") from exc
        return self._prompt(inputs["input_ids"][0], inputs.get("pixel_values"), inputs.get("image_grid_thw"),
                            inputs.get("mm_token_type_ids"), images)

    def _prompt(self, input_ids: torch.Tensor, pixel_values, grid, token_types, images: list) -> Prompt:
        mrope, delta = None, 0
        if grid is not None:
            with torch.no_grad():
                positions, deltas = self._get_rope_index(input_ids[None], mm_token_type_ids=token_types,
                                                         image_grid_thw=grid)
            mrope, delta = positions[:, 0], int(deltas.reshape(-1)[0])
        hashes = prompt_block_hashes(input_ids, self.image_token_id, [image_digest(image) for image in images])
        return Prompt(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, mrope_positions=mrope,
                      rope_delta=delta, block_hashes=hashes)

    def largest(self) -> Prompt:
        """A prompt the size of the largest request `request` admits (service/sizing.py's rule):
        the most images of max_pixels that fit the context, then text up to max_model_len - 1 tokens."""
        images: list = []
        if self._takes_images:
            from PIL import Image

            side = int(self.settings.max_pixels ** 0.5)
            images = [Image.new("RGB", (side, side), (127, 127, 127))] * self.settings.max_images_per_request

        def with_images(count: int) -> Prompt:
            content = [{"type": "image"}] * count + [{"type": "text", "text": "x"}]
            return self.build([{"role": "user", "content": content}], images[:count])

        count = images_in_largest_request(len(images), self.max_model_len, lambda n: with_images(n).length)
        prompt = with_images(count)
        extra = max(0, self.max_model_len - 1 - prompt.length)
        input_ids = torch.cat([prompt.input_ids, prompt.input_ids[-1:].repeat(extra)])
        types = None
        if prompt.image_grid_thw is not None:
            types = (input_ids == self.image_token_id).to(torch.int32)[None]
        return self._prompt(input_ids, prompt.pixel_values, prompt.image_grid_thw, types, images[:count])

    def warmup_request(self) -> GenerationRequest:
        """One short request through the whole path (an image included when the model takes images)."""
        content: list[dict] = [{"type": "text", "text": "Describe the image."}]
        images = []
        if self._takes_images:
            from PIL import Image

            images = [Image.new("RGB", (64, 64), (127, 127, 127))]
            content.insert(0, {"type": "image"})
        return self.request([{"role": "user", "content": content}], images, max_tokens=2, temperature=0.0)


def _sampling_defaults(generation_config: Any) -> dict:
    """Request defaults from the model's generation config, as vLLM does; OpenAI's otherwise."""
    sampled = bool(getattr(generation_config, "do_sample", False))
    return {
        "temperature": float(getattr(generation_config, "temperature", None) or 1.0) if sampled else 1.0,
        "top_p": float(getattr(generation_config, "top_p", None) or 1.0) if sampled else 1.0,
        "top_k": int(getattr(generation_config, "top_k", None) or 0) if sampled else 0,
    }
