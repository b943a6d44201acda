"""transformers' own prefill, copied into a slot of the paged cache: the reference the tests compare
the engine's prefill and decode step with, and the quick way benchmarks fill slots. The service
prefills with service/decode/qwen3_prefill.py; nothing here is used by it.

transformers' ``generate`` computes Qwen3-VL's 4-row position ids itself (text row from the attention
mask, mrope rows from ``get_rope_index``); a bare ``model(...)`` call on a left-padded batch without
images would instead count the padding, and ``model.model.rope_deltas`` keeps a stale value after a
text-only call. So the prefill passes explicit position ids and returns each row's rope delta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prefill:
    logits: torch.Tensor  # [B, vocab] float32: the next-token logits of each row
    past_key_values: Any  # the model's cache (DynamicCache), [B, Hkv, T, D] per layer, left-padded
    lengths: list[int]  # real (unpadded) tokens per row
    rope_deltas: list[int]  # next rotary position = length + rope_delta


def mm_token_type_ids_for(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """0 for text, 1 for image and 2 for video placeholder tokens (as the Qwen3-VL processor makes)."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == model.config.image_token_id] = 1
    types[input_ids == model.config.video_token_id] = 2
    return types


def prefill_position_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         mm_token_type_ids: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None,
                         video_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids ``[4, B, T]`` (text row, then t/h/w) and rope deltas ``[B]``, as ``generate`` makes them."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if image_grid_thw is not None or video_grid_thw is not None:
        if mm_token_type_ids is None:
            mm_token_type_ids = mm_token_type_ids_for(model, input_ids)
        mrope, deltas = model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, attention_mask=attention_mask)
    else:
        mrope = text[None].expand(3, -1, -1)
        deltas = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    return torch.cat([text[None], mrope.to(text.device)], dim=0), deltas.reshape(-1)


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            **inputs: Any) -> Prefill:
    """Run the prompt(s) through the model; keep the cache and only the last position's logits.

    ``inputs`` are the processor's other outputs (``pixel_values``, ``image_grid_thw``,
    ``mm_token_type_ids``, ...). Batches must be left-padded.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids, deltas = prefill_position_ids(
        model, input_ids, attention_mask, inputs.get("mm_token_type_ids"),
        inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **inputs)
    return Prefill(logits=out.logits[:, -1].float(), past_key_values=out.past_key_values,
                   lengths=attention_mask.sum(-1).tolist(), rope_deltas=deltas.tolist())


def load_prefill(cache: Any, slot: int, past_key_values: Any, length: int, *, row: int = 0,
                 rope_delta: int = 0) -> None:
    """Copy one sequence's K/V from a transformers cache after a prefill into ``slot`` of a
    PagedKVCache (allocated with room for it).

    ``past_key_values`` is the prefill's cache (a ``DynamicCache``, or the legacy tuple of
    ``(key, value)`` per layer), each ``[batch, Hkv, T, D]``; the sequence is batch row ``row``
    with ``length`` real tokens (left padding: the last ``length`` of the ``T`` positions).
    ``rope_delta`` is the row's mrope offset: next position = length + delta.
    """
    dst = cache.positions(slot, length).to(cache.device)
    for layer in range(cache.num_layers):
        k, v = _layer_kv(past_key_values, layer)
        total = k.shape[-2]
        if length > total:
            raise ValueError(f"length {length} exceeds the prefill's {total} positions")
        cache.keys[layer].index_copy_(1, dst, k[row, :, total - length:])
        cache.values[layer].index_copy_(1, dst, v[row, :, total - length:])
    cache.set_prefilled(slot, length, rope_delta)


def _layer_kv(past_key_values: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:  # transformers >= 4.56: Cache.layers[i].keys / .values
        return layers[layer].keys, layers[layer].values
    key, value = past_key_values[layer][:2]
    return key, value
