"""A static key/value cache with one slot per running sequence (continuous batching without paging).

Per layer, K and V live in pools shaped ``[S, Hkv, L + 1, D]`` (S slots, L the max context, D the
head size) in the model's dtype on the model's device. They are allocated once, so CUDA graphs can be
captured over them and the memory use is known at start-up. Column ``L`` is scratch: a decode step
writes the K/V of inactive rows there, so a static-shape step never touches a sequence's real data.
"""
from __future__ import annotations

import heapq
from typing import Any

import torch

GIB = 1024**3


def _text_config(config: Any) -> Any:
    """The decoder's config, from a composite (image-text) config or a text config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _head_dim(text_config: Any) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


class SlotKVCache:
    """K/V pools with ``num_slots`` slots of ``max_len`` tokens, and which slot holds how many tokens.

    Host bookkeeping (``lengths``, ``rope_deltas``, the free list) is the truth the scheduler reads;
    ``lengths_dev`` mirrors ``lengths`` on the device for the decode step (which advances it itself).
    """

    def __init__(self, config: Any, num_slots: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"need at least one slot and one token (got {num_slots} slots of {max_len})")
        text = _text_config(config)
        self.num_slots = num_slots
        self.max_len = max_len
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = _head_dim(text)
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_slots, self.num_kv_heads, max_len + 1, self.head_dim)  # + 1: the scratch column
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        self.lengths = [0] * num_slots
        self.rope_deltas = [0] * num_slots
        self.lengths_dev = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self._free = list(range(num_slots))  # a heap: the lowest free slot first keeps batches compact

    # ---- sizing

    @staticmethod
    def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """K and V bytes one token takes over all layers."""
        text = _text_config(config)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * text.num_hidden_layers * text.num_key_value_heads * _head_dim(text) * itemsize

    @classmethod
    def slots_for_budget(cls, config: Any, budget_gib: float, max_len: int, *, dtype: torch.dtype) -> int:
        """How many slots of ``max_len`` tokens fit in ``budget_gib``."""
        return int(budget_gib * GIB) // (cls.bytes_per_token(config, dtype) * (max_len + 1))

    @classmethod
    def from_budget(cls, config: Any, budget_gib: float, max_len: int, *, dtype: torch.dtype,
                    device: torch.device | str, max_slots: int | None = None) -> "SlotKVCache":
        """As many slots as fit in ``budget_gib`` (at most ``max_slots``); at least one must fit."""
        slots = cls.slots_for_budget(config, budget_gib, max_len, dtype=dtype)
        if max_slots is not None:
            slots = min(slots, max_slots)
        if slots < 1:
            need = cls.bytes_per_token(config, dtype) * (max_len + 1) / GIB
            raise ValueError(f"a KV budget of {budget_gib:.2f} GiB holds no sequence of {max_len} tokens "
                             f"(one needs {need:.2f} GiB): lower the max context or raise the budget")
        return cls(config, slots, max_len, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # ---- slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """The lowest free slot (now empty), or None when all are taken."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._set_length(slot, 0)
        self.rope_deltas[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self._set_length(slot, 0)
        self.rope_deltas[slot] = 0
        heapq.heappush(self._free, slot)

    def _set_length(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        self.lengths_dev[slot] = length

    # ---- filling from a prefill

    def load_prefill(self, slot: int, past_key_values: Any, length: int, *, row: int = 0,
                     rope_delta: int = 0) -> None:
        """Copy one sequence's K/V from a transformers cache after a prefill into ``slot``.

        ``past_key_values`` is the prefill's cache (a ``DynamicCache``, or the legacy tuple of
        ``(key, value)`` per layer), each ``[batch, Hkv, T, D]``; the sequence is batch row ``row``
        with ``length`` real tokens. Batched prefill is left-padded (as transformers' ``generate``
        does), so the real tokens are the last ``length`` of the ``T`` positions. ``rope_delta`` is
        the row's mrope offset (``rope_deltas`` of the prefill): next position = length + delta.
        """
        if slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        if not 0 < length <= self.max_len:
            raise ValueError(f"a sequence of {length} tokens does not fit a slot of {self.max_len}")
        for layer in range(self.num_layers):
            k, v = _layer_kv(past_key_values, layer)
            total = k.shape[-2]
            if length > total:
                raise ValueError(f"length {length} exceeds the prefill's {total} positions")
            self.keys[layer][slot, :, :length].copy_(k[row, :, total - length:])
            self.values[layer][slot, :, :length].copy_(v[row, :, total - length:])
        self._set_length(slot, length)
        self.rope_deltas[slot] = int(rope_delta)


def _layer_kv(past_key_values: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:  # transformers >= 4.56: Cache.layers[i].keys / .values
        return layers[layer].keys, layers[layer].values
    key, value = past_key_values[layer][:2]
    return key, value
