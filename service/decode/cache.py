"""A paged key/value cache: sequences hold fixed-size blocks of one shared pool (continuous batching).

Per layer, K and V live in pools shaped ``[Hkv, (N + 1) * block_size, D]`` (N blocks, D the head
size) in the model's dtype on the model's device, allocated once, so CUDA graphs can be captured
over them and the memory use is known at start-up. The last block is scratch: a decode step writes
the K/V of inactive rows there, and the unused entries of every block table point at it, so a
static-shape step never touches a sequence's real data.

A sequence holds a *slot* (a row of the block table, a row of the decode batch) and the blocks it
reserved when it was admitted: enough for its prompt and all the tokens it may generate, so a
running sequence never runs out of room (no preemption) and requests reserve what they can use,
not the whole context. The block table ``[slots, max_blocks]`` (int32, on the device) maps a
slot's logical block ``j`` (positions ``j*B .. j*B+B-1``) to a block of the pool.
"""
from __future__ import annotations

import heapq
from typing import Any

import torch

GIB = 1024**3
BLOCK_SIZE = 64  # tokens per block: the split-KV attention kernel's block of work


def _text_config(config: Any) -> Any:
    """The decoder's config, from a composite (image-text) config or a text config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _head_dim(text_config: Any) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


class PagedKVCache:
    """K/V pools of ``num_blocks`` blocks shared by up to ``num_slots`` sequences of at most ``max_len`` tokens.

    Host bookkeeping (``lengths``, ``capacity``, ``rope_deltas``, block lists, free lists) is the
    truth the scheduler reads; ``lengths_dev`` and ``block_table`` mirror it on the device for the
    decode step (which advances ``lengths_dev`` itself).
    """

    def __init__(self, config: Any, num_slots: int, max_len: int, num_blocks: int | None = None, *,
                 dtype: torch.dtype, device: torch.device | str, block_size: int = BLOCK_SIZE) -> None:
        if num_slots < 1 or max_len < 1 or block_size < 1:
            raise ValueError(f"need at least one slot and one token (got {num_slots} slots of {max_len})")
        self.block_size = block_size
        self.max_blocks = blocks_for(max_len, block_size)  # blocks of one sequence of max_len tokens
        num_blocks = num_slots * self.max_blocks if num_blocks is None else num_blocks
        if num_blocks < self.max_blocks:
            raise ValueError(f"{num_blocks} blocks of {block_size} tokens hold no sequence of {max_len} tokens")
        text = _text_config(config)
        self.num_slots = num_slots
        self.max_len = max_len
        self.num_blocks = num_blocks
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = _head_dim(text)
        self.dtype = dtype
        self.device = torch.device(device)
        self.scratch_block = num_blocks  # the extra block after the real ones
        shape = (self.num_kv_heads, (num_blocks + 1) * block_size, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        self.block_table = torch.full((num_slots, self.max_blocks), num_blocks, dtype=torch.int32, device=self.device)
        self.lengths = [0] * num_slots
        self.capacity = [0] * num_slots  # tokens a slot's blocks hold
        self.rope_deltas = [0] * num_slots
        self.lengths_dev = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self._blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self._free = list(range(num_slots))  # heaps: the lowest first keeps batches compact
        self._free_blocks = list(range(num_blocks))

    # ---- sizing

    @staticmethod
    def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """K and V bytes one token takes over all layers."""
        text = _text_config(config)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * text.num_hidden_layers * text.num_key_value_heads * _head_dim(text) * itemsize

    @classmethod
    def blocks_for_budget(cls, config: Any, budget_bytes: int, *, dtype: torch.dtype,
                          block_size: int = BLOCK_SIZE) -> int:
        """How many blocks (beside the scratch block) fit in ``budget_bytes``."""
        return max(0, int(budget_bytes) // (cls.bytes_per_token(config, dtype) * block_size) - 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # ---- slots and blocks

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    def blocks_needed(self, tokens: int) -> int:
        return blocks_for(max(1, min(tokens, self.max_len)), self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return bool(self._free) and self.blocks_needed(tokens) <= len(self._free_blocks)

    def allocate(self, tokens: int | None = None) -> int | None:
        """The lowest free slot (now empty) with blocks for ``tokens`` (default: ``max_len``) reserved,
        or None when no slot or not enough blocks are free."""
        tokens = self.max_len if tokens is None else tokens
        if not self.can_allocate(tokens):
            return None
        slot = heapq.heappop(self._free)
        blocks = [heapq.heappop(self._free_blocks) for _ in range(self.blocks_needed(tokens))]
        self._blocks[slot] = blocks
        self.capacity[slot] = min(self.max_len, len(blocks) * self.block_size)
        row = torch.full((self.max_blocks,), self.scratch_block, dtype=torch.int32)
        row[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_table[slot].copy_(row)
        self._set_length(slot, 0)
        self.rope_deltas[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        for block in self._blocks[slot]:
            heapq.heappush(self._free_blocks, block)
        self._blocks[slot] = []
        self.capacity[slot] = 0
        # The table row keeps pointing at the old blocks until the slot is taken again: a step
        # still in flight for it finishes in stream order before anyone else writes them.
        self._set_length(slot, 0)
        self.rope_deltas[slot] = 0
        heapq.heappush(self._free, slot)

    def _set_length(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        self.lengths_dev[slot] = length

    def positions(self, slot: int, length: int) -> torch.Tensor:
        """Where tokens ``0..length-1`` of ``slot`` live in a pool (flat position indices)."""
        if slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        if not 0 < length <= self.capacity[slot]:
            raise ValueError(f"a sequence of {length} tokens does not fit slot {slot} ({self.capacity[slot]} reserved)")
        index = torch.arange(length)
        blocks = torch.tensor(self._blocks[slot], dtype=torch.long)
        return blocks[index // self.block_size] * self.block_size + index % self.block_size

    def set_prefilled(self, slot: int, length: int, rope_delta: int = 0) -> None:
        """A prefill wrote ``length`` tokens into ``slot``: it decodes from there."""
        if not 0 < length <= self.capacity[slot]:
            raise ValueError(f"a sequence of {length} tokens does not fit slot {slot} ({self.capacity[slot]} reserved)")
        self._set_length(slot, length)
        self.rope_deltas[slot] = int(rope_delta)

    # ---- filling from a prefill

    def load_prefill(self, slot: int, past_key_values: Any, length: int, *, row: int = 0,
                     rope_delta: int = 0) -> None:
        """Copy one sequence's K/V from a transformers cache after a prefill into ``slot``.

        ``past_key_values`` is the prefill's cache (a ``DynamicCache``, or the legacy tuple of
        ``(key, value)`` per layer), each ``[batch, Hkv, T, D]``; the sequence is batch row ``row``
        with ``length`` real tokens (left padding: the last ``length`` of the ``T`` positions).
        ``rope_delta`` is the row's mrope offset: next position = length + delta.
        """
        dst = self.positions(slot, length).to(self.device)
        for layer in range(self.num_layers):
            k, v = _layer_kv(past_key_values, layer)
            total = k.shape[-2]
            if length > total:
                raise ValueError(f"length {length} exceeds the prefill's {total} positions")
            self.keys[layer].index_copy_(1, dst, k[row, :, total - length:])
            self.values[layer].index_copy_(1, dst, v[row, :, total - length:])
        self.set_prefilled(slot, length, rope_delta)


def _layer_kv(past_key_values: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:  # transformers >= 4.56: Cache.layers[i].keys / .values
        return layers[layer].keys, layers[layer].values
    key, value = past_key_values[layer][:2]
    return key, value
