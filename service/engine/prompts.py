"""Chat messages and images (or a completion's text or token ids) -> a validated request: chat
template, image processor, vLLM's truncate_prompt_tokens, positions.

CPU work that touches no weights, so it runs on any thread (the HTTP layer runs it off the event
loop) while the scheduler thread keeps the device busy. The rules of what a request may be (how
many images, how long a prompt and its answer, its sampling parameters) are checked here, once,
and the work is bounded before it is done: a text longer than the context could hold is refused
before it is tokenized (no token is longer than the vocabulary's longest entry; one to be
truncated is cut to that length first, as vLLM cuts it), and stop and bad-word lists are capped.
Whatever else fails while one request is prepared is that request's 400: the processor's own
errors on odd input included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from service.decode.cache import image_digest, prompt_block_hashes
from service.engine.loading import image_kwargs
from service.engine.requests import GenerationRequest, Prompt
from service.engine.sampling import SamplingParams
from service.engine.stops import MAX_STOP_CHARS, MAX_STOP_STRINGS, StopMatcher
from service.errors import InvalidRequest, ServiceError
from service.settings import ServiceSettings
from service.sizing import images_in_largest_request


@dataclass(frozen=True)
class Truncation:
    """vLLM's truncate_prompt_tokens: the prompt cut to its last (side "left", vLLM's default for
    generation) or first `keep` tokens before it is run. vLLM cuts the chat template's tokens before
    its processor expands each image's one placeholder token to the image's tokens, so here too an
    image counts as one token and is kept whole; a cut that would drop one is refused (vLLM's
    processor then fails the request with a 500: it finds fewer placeholders than images)."""

    keep: int
    side: Literal["left", "right"] = "left"

    def text(self, text: str, limit: int) -> str:
        """vLLM's cut of a text longer than `limit` characters (more than its tokens could fill)
        before it is tokenized, from the side the tokens are cut from: what it keeps holds more than
        `keep` tokens, so the tokens kept are the same, and the tokenizer's work stays bounded."""
        if len(text) <= limit:
            return text
        return text[-limit:] if self.side == "left" else text[:limit]

    def span(self, input_ids: torch.Tensor, image_token_id: int) -> slice:
        """The kept part of the (expanded) prompt's ids; InvalidRequest when it would drop an image."""
        is_image = input_ids == image_token_id
        expanded = torch.zeros_like(is_image)
        expanded[1:] = is_image[1:] & is_image[:-1]  # an image's tokens after its first: vLLM's placeholder
        counted = torch.nonzero(~expanded).flatten().tolist()  # where each token vLLM counts starts
        if self.keep >= len(counted):
            return slice(None)
        if self.keep == 0:
            kept = slice(0, 0)
        elif self.side == "left":
            kept = slice(counted[len(counted) - self.keep], None)
        else:
            kept = slice(0, counted[self.keep])
        if int(is_image.sum()) != int(is_image[kept].sum()):
            raise InvalidRequest(
                f"truncate_prompt_tokens={self.keep} (truncation_side {self.side}) would cut an image out of the "
                "prompt: each image counts as one token here, as vLLM counts it before its processor expands the "
                "image, and an image is kept whole or not at all (vLLM fails such a request). Keep more tokens, or "
                "cut from the other side.", param="truncate_prompt_tokens", value=self.keep)
        return kept


class PromptBuilder:
    def __init__(self, model: Any, processor: Any, settings: ServiceSettings, max_model_len: int):
        self.processor = processor
        self.settings = settings
        self.max_model_len = max_model_len
        self.image_token_id = model.config.image_token_id
        self._get_rope_index = model.model.get_rope_index
        # The processor's patches are float32; the vision tower casts them to its own dtype (bf16 on
        # the GPU). Cast here, in the request's thread: half the bytes to hold while queued and to copy
        # to the device in the engine's (the same rounding either side).
        self._pixel_dtype = model.model.visual.patch_embed.proj.weight.dtype
        self._image_kwargs = image_kwargs(processor, settings)
        self._takes_images = settings.max_images_per_request > 0 and hasattr(processor, "image_processor")
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        # No token stands for more characters than the vocabulary's longest entry: a text longer than
        # max_model_len of them cannot fit, whatever its tokens (bounds the tokenizer's work).
        self._max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self.sampling_defaults, self.default_max_tokens = _sampling_defaults(getattr(model, "generation_config", None))

    def check_image_count(self, count: int) -> None:
        """InvalidRequest when a request brings more images than the settings admit (callers may
        check before decoding them; `request` checks again)."""
        limit = self.settings.max_images_per_request
        if count > limit:
            raise InvalidRequest(f"At most {limit} image(s) may be provided in one request; got {count}.",
                                 param="messages", kind="too_many_images")

    def request(self, messages: list[dict], images: list, *, max_tokens: int | None = None,
                bad_words: tuple[str, ...] = (), chat_template_kwargs: dict | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                add_special_tokens: bool = False, cache_salt: str | None = None,
                mm_processor_kwargs: dict | None = None, tools: list[dict] | None = None,
                truncate_prompt_tokens: int | None = None, truncation_side: str | None = None,
                **sampling: Any) -> GenerationRequest:
        """A request the engine can run, or InvalidRequest. ``sampling``: SamplingParams fields; those
        left None take the model's generation_config defaults, as vLLM does (get_diff_sampling_param).
        tools: the function tools the chat template shows the model. truncate_prompt_tokens,
        truncation_side: vLLM's (`truncation`)."""
        self.check_image_count(len(images))
        truncation = self.truncation(truncate_prompt_tokens, truncation_side, max_tokens)
        prompt = self.build(messages, images, chat_template_kwargs=chat_template_kwargs, tools=tools,
                            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                            add_special_tokens=add_special_tokens, cache_salt=cache_salt,
                            mm_processor_kwargs=mm_processor_kwargs, truncation=truncation)
        return self.request_for(prompt, max_tokens=max_tokens, bad_words=bad_words, **sampling)

    def request_text(self, text: str, *, add_special_tokens: bool = True, cache_salt: str | None = None,
                     truncate_prompt_tokens: int | None = None, truncation_side: str | None = None,
                     **sampling: Any) -> GenerationRequest:
        """The request for a plain text prompt (no chat template), as `request`."""
        truncation = self.truncation(truncate_prompt_tokens, truncation_side, sampling.get("max_tokens"))
        prompt = self.build_text(text, [], add_special_tokens=add_special_tokens, cache_salt=cache_salt,
                                 truncation=truncation)
        return self.request_for(prompt, **sampling)

    def request_tokens(self, token_ids: list[int], *, cache_salt: str | None = None,
                       truncate_prompt_tokens: int | None = None, truncation_side: str | None = None,
                       **sampling: Any) -> GenerationRequest:
        """The request for a prompt of token ids, as `request` (their range is checked once they are
        cut, as vLLM checks the ids it runs)."""
        truncation = self.truncation(truncate_prompt_tokens, truncation_side, sampling.get("max_tokens"))
        if self.image_token_id in token_ids:
            raise InvalidRequest("a token-id prompt may not hold image placeholders", param="prompt")
        input_ids = torch.tensor(token_ids, dtype=torch.long)
        if truncation is not None:
            input_ids = input_ids[truncation.span(input_ids, self.image_token_id)]
        if any(not 0 <= t < self.vocab_size for t in input_ids.tolist()):
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        return self.request_for(self._prompt(input_ids, None, None, None, [], cache_salt), **sampling)

    def truncation(self, tokens: int | None, side: str | None, max_tokens: int | None) -> Truncation | None:
        """vLLM's TokenizeParams for truncate_prompt_tokens (None: no truncation; -1: as many as the
        context leaves the answer), with its checks, in its words, before the prompt is built."""
        if tokens is None:
            return None
        output = max_tokens or 0
        if output > self.max_model_len:  # vLLM says this first
            self.check_length(0, output)
        room = self.max_model_len - output
        if tokens > room:
            raise InvalidRequest(f"truncate_prompt_tokens={tokens} cannot be greater than max_model_len - max_tokens = "
                                 f"{room}. Please request a smaller truncation size.", param="truncate_prompt_tokens",
                                 value=tokens, kind="prompt_too_long")
        return Truncation(room if tokens < 0 else tokens, side or "left")

    def request_for(self, prompt: Prompt, *, max_tokens: int | None = None, bad_words: tuple[str, ...] = (),
                    **sampling: Any) -> GenerationRequest:
        """The request for a built prompt: its length checked against the context, its sampling
        parameters validated (InvalidRequest names the field)."""
        length = prompt.length
        if length == 0:  # vLLM's words (a prompt truncated to 0 tokens)
            raise InvalidRequest("The decoder prompt cannot be empty")
        room = self.max_model_len - length
        if max_tokens is None and room == 0:  # vLLM: the rest of the context, here none
            raise InvalidRequest("max_tokens must be at least 1, got 0.", param="max_tokens", value=0,
                                 kind="prompt_too_long")
        self.check_length(length, max_tokens)
        if max_tokens is None:  # vLLM: the rest of the context, or the configured default if smaller
            max_tokens = min(d for d in (room, self.settings.max_tokens_default, self.default_max_tokens) if d)
        given = {k: v for k, v in sampling.items() if v is not None}
        for name in ("stop", "stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
            if name in given:
                given[name] = tuple(given[name])
        if "logit_bias" in given:
            given["logit_bias"] = tuple(given["logit_bias"].items()) if isinstance(given["logit_bias"], dict) \
                else tuple(given["logit_bias"])
        stop = given.get("stop", ())
        _check_list("stop", stop)
        _check_list("bad_words", bad_words)
        if bad_words:
            given["bad_words_token_ids"] = self.bad_words_token_ids(bad_words)
        params = SamplingParams(max_tokens=max_tokens, **{**self.sampling_defaults, **given})
        params.check_vocab(self.vocab_size)
        if params.n > self.settings.max_batch_size:
            raise InvalidRequest(f"n must be at most {self.settings.max_batch_size} (this server's max_batch_size: "
                                 f"each choice is a batch row), got {params.n}.", param="n", kind="invalid_sampling")
        return GenerationRequest(prompt=prompt, params=params, stop_matcher=StopMatcher(stop) if stop else None)

    def check_length(self, length: int, max_tokens: int | None) -> None:
        """vLLM 0.27's checks of a prompt of `length` tokens and the answer's max_tokens against the
        context, in its words (TokenizeParams, then the input processor's for a prompt that fills it)."""
        context, output = self.max_model_len, max_tokens or 0
        if output > context:
            raise InvalidRequest(f"max_tokens={output} cannot be greater than max_model_len=max_total_tokens={context}. "
                                 "Please request fewer output tokens.", param="max_tokens", value=output,
                                 kind="prompt_too_long")
        if length + output > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you requested {output} output "
                f"tokens and your prompt contains {length} input tokens, for a total of {length + output} tokens. "
                "Please reduce the length of the input prompt or the number of requested output tokens.",
                param="input_tokens", value=length, kind="prompt_too_long")
        if length == context:
            raise InvalidRequest(
                f"The decoder prompt (length {length}) plus the number of requested output tokens (at least 1) is "
                f"longer than the maximum model length of {context}. Make sure that `max_model_len` is no smaller "
                "than the number of text tokens (prompt + requested output tokens).", kind="prompt_too_long")

    def check_text_length(self, text: str) -> None:
        """vLLM's check of a text too long for its tokens to fit (before tokenizing it), in its words
        but for the output tokens (its bound leaves room for them): no token stands for more
        characters than the vocabulary's longest entry."""
        limit = self.max_model_len * self._max_token_chars
        if len(text) > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt contains "
                f"{len(text)} characters (more than {limit} characters, which is the upper bound for "
                f"{self.max_model_len} input tokens). Please reduce the length of the input prompt.",
                param="input_text", value=len(text), kind="prompt_too_long")

    def bad_words_token_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """vLLM's update_from_tokenizer: each word as it is tokenized at the start of a text, and
        with a leading space where that makes another word token of the same length."""
        out: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            for ids in (bare, spaced) if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare) \
                    else (bare,):
                if ids:
                    out.append(ids)
        return tuple(out)

    def render(self, messages: list[dict], *, chat_template_kwargs: dict | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               tools: list[dict] | None = None) -> str:
        """The chat template's text (InvalidRequest when the template refuses the messages)."""
        if continue_final_message and add_generation_prompt:
            raise InvalidRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        kwargs = dict(chat_template_kwargs or {})
        reserved = {"messages", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt",
                    "continue_final_message", "return_dict", "return_assistant_tokens_mask"} & set(kwargs)
        if reserved:
            raise InvalidRequest(f"chat_template_kwargs may not set {sorted(reserved)}.", param="chat_template_kwargs")
        try:
            return self.processor.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message,
                                                      tokenize=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the template's errors on these messages are theirs
            raise InvalidRequest(f"cannot apply the chat template: {type(exc).__name__}: {exc}",
                                 param="messages") from None

    def build(self, messages: list[dict], images: list, *, chat_template_kwargs: dict | None = None,
              add_generation_prompt: bool = True, continue_final_message: bool = False,
              add_special_tokens: bool = False, cache_salt: str | None = None,
              mm_processor_kwargs: dict | None = None, tools: list[dict] | None = None,
              truncation: Truncation | None = None) -> Prompt:
        """Chat template (with the tools, when given) + processor + positions + prefix-cache hashes;
        InvalidRequest when the input cannot make a prompt."""
        text = self.render(messages, chat_template_kwargs=chat_template_kwargs, tools=tools,
                           add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
        return self.build_text(text, images, add_special_tokens=add_special_tokens, cache_salt=cache_salt,
                               mm_processor_kwargs=mm_processor_kwargs, truncation=truncation)

    def image_options(self, mm_processor_kwargs: dict | None) -> dict:
        """The image processor's per-call options: the server's min/max pixels, or a request's own
        within them (vLLM's mm_processor_kwargs; the memory plan holds for images of max_pixels at most)."""
        options = dict(self._image_kwargs)
        for name, value in (mm_processor_kwargs or {}).items():
            if name not in ("min_pixels", "max_pixels") or name not in options:
                raise InvalidRequest(f"mm_processor_kwargs.{name} is not supported: this server takes min_pixels "
                                     "and max_pixels.", param="mm_processor_kwargs")
            if isinstance(value, bool) or not isinstance(value, int) or not \
                    self.settings.min_pixels <= value <= self.settings.max_pixels:
                raise InvalidRequest(f"mm_processor_kwargs.{name} must be an integer between the server's min_pixels "
                                     f"({self.settings.min_pixels}) and max_pixels ({self.settings.max_pixels}); "
                                     f"got {value!r}.", param="mm_processor_kwargs")
            options[name] = value
        if options.get("min_pixels", 0) > options.get("max_pixels", 1 << 62):
            raise InvalidRequest("mm_processor_kwargs: min_pixels is over max_pixels.", param="mm_processor_kwargs")
        return options

    def build_text(self, text: str, images: list, *, add_special_tokens: bool = False,
                   cache_salt: str | None = None, mm_processor_kwargs: dict | None = None,
                   truncation: Truncation | None = None) -> Prompt:
        """A prompt from its text (with one image placeholder per image), cut as `truncation` says."""
        image_options = self.image_options(mm_processor_kwargs)
        whole = text
        if truncation is not None and not images:  # with images the text is whole (its placeholders with it)
            text = truncation.text(text, self.max_model_len * self._max_token_chars)
        self.check_text_length(text)
        self._check_placeholders(text, len(images))
        try:
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt",
                                    add_special_tokens=add_special_tokens, **(image_options if images else {}))
            input_ids, types = inputs["input_ids"][0], inputs.get("mm_token_type_ids")
            if truncation is not None:
                kept = truncation.span(input_ids, self.image_token_id)
                input_ids, types = input_ids[kept], None if types is None else types[:, kept]
            prompt = self._prompt(input_ids, inputs.get("pixel_values"), inputs.get("image_grid_thw"), types, images,
                                  cache_salt)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - StopIteration, IndexError ...: the processor refused this input
            raise InvalidRequest(f"cannot build the prompt: {type(exc).__name__}: {exc}", param="messages") from None
        prompt.text = whole  # vLLM's prompt text is the whole one: it cuts the tokens only
        return prompt

    def _check_placeholders(self, text: str, images: int) -> None:
        """The image placeholders the text spells must be the images' own: one per image (a user's
        text spelling them too would leave the processor with placeholders and no image)."""
        tokens = self.tokenizer
        pad = tokens.convert_ids_to_tokens(self.image_token_id)
        spelled = text.count(pad)
        if images and spelled != images:
            raise InvalidRequest(f"The prompt holds {spelled} image placeholder(s) {pad} for {images} image(s): "
                                 f"the text of a message may not spell {pad}.", param="messages")
        video = getattr(tokens, "video_token", None) or "<|video_pad|>"
        if video in text:
            raise InvalidRequest(f"Videos are not supported: the text may not spell {video}.", param="messages")

    def _prompt(self, input_ids: torch.Tensor, pixel_values, grid, token_types, images: list,
                cache_salt: str | None = None) -> Prompt:
        mrope, delta = None, 0
        if grid is not None:
            with torch.no_grad():
                positions, deltas = self._get_rope_index(input_ids[None], mm_token_type_ids=token_types,
                                                         image_grid_thw=grid)
            mrope, delta = positions[:, 0], int(deltas.reshape(-1)[0])
        hashes = prompt_block_hashes(input_ids, self.image_token_id, [image_digest(image) for image in images],
                                     salt=cache_salt.encode("utf-8") if cache_salt else b"")
        if pixel_values is not None and pixel_values.is_floating_point():
            pixel_values = pixel_values.to(self._pixel_dtype)
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
        """One short request through the whole path (an image included when the model takes images
        and one fits the context: min_pixels can make even a small image longer than a short one)."""
        text = [{"type": "text", "text": "Describe the image."}]
        if self._takes_images:
            from PIL import Image

            try:
                return self.request([{"role": "user", "content": [{"type": "image"}, *text]}],
                                    [Image.new("RGB", (64, 64), (127, 127, 127))], max_tokens=2, temperature=0.0)
            except InvalidRequest:  # longer than the context: the warm-up is text only
                pass
        return self.request([{"role": "user", "content": text}], [], max_tokens=2, temperature=0.0)


def _sampling_defaults(generation_config: Any) -> tuple[dict, int | None]:
    """The request defaults from the model's generation config, as vLLM takes them
    (ModelConfig.get_diff_sampling_param): the values that differ from transformers' defaults, of
    repetition_penalty, temperature, top_k, top_p and min_p (do_sample is not read); and its
    max_new_tokens, the default max_tokens when a request sets none."""
    diff = generation_config.to_diff_dict() if generation_config is not None else {}
    defaults = {name: diff[name] for name in ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")
                if diff.get(name) is not None}
    if "top_k" in defaults:
        defaults["top_k"] = max(int(defaults["top_k"]), 0)
    return defaults, diff.get("max_new_tokens")


def _check_list(name: str, items: tuple[str, ...]) -> None:
    """Stop strings and bad words: each costs work per generated token, so their lists are capped."""
    if len(items) > MAX_STOP_STRINGS or sum(len(s) for s in items) > MAX_STOP_CHARS:
        raise InvalidRequest(f"{name} may hold at most {MAX_STOP_STRINGS} strings of {MAX_STOP_CHARS} characters "
                             f"in all; got {len(items)} of {sum(len(s) for s in items)}.", param=name,
                             kind="invalid_sampling")
    if any(not s for s in items):
        raise InvalidRequest(f"{name} cannot contain an empty string.", param=name, kind="invalid_sampling")
