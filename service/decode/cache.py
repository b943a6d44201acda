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

Prefix caching: a block filled by a prompt is registered under a hash of everything up to its end
(token ids and the images' contents, :func:`prompt_block_hashes`). A later prompt that starts the
same way (the same image with another question, the next turn of a chat) takes those blocks
read-only instead of computing them again; blocks are reference-counted, and a registered block that
nobody uses stays cached until a fresh block is needed (least recently used first).
"""
from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from typing import Any, Sequence

import torch

from service.sizing import BLOCK_SIZE, blocks_for, kv_bytes_per_token


def _text_config(config: Any) -> Any:
    """The decoder's config, from a composite (image-text) config or a text config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _head_dim(text_config: Any) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def image_digest(image: Any) -> bytes:
    """What identifies an image's pixels (a PIL image: mode, size and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.digest()


def prompt_block_hashes(input_ids: torch.Tensor, image_token_id: int | None, image_digests: Sequence[bytes],
                        block_size: int = BLOCK_SIZE, salt: bytes = b"") -> list[bytes]:
    """One hash per full block of the prompt, each covering everything up to the block's end: its
    token ids and the digest of every image whose tokens start by then (image tokens share one id,
    so the ids alone would not tell two images apart). Host work, for any thread. Empty when the
    image tokens do not come as one run per image (a user's text spelling the placeholder token):
    then nothing of the prompt is shared. ``salt`` (vLLM's cache_salt) starts the chain: only
    prompts with the same salt share blocks."""
    ids = input_ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == image_token_id and (i == 0 or ids[i - 1] != image_token_id)]
    if len(starts) != len(image_digests):
        return []
    hashes, previous, seen = [], hashlib.blake2b(salt, digest_size=16).digest() if salt else b"", 0
    for end in range(block_size, len(ids) + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(input_ids[end - block_size:end].numpy().tobytes())
        while seen < len(starts) and starts[seen] < end:
            digest.update(image_digests[seen])
            seen += 1
        previous = digest.digest()
        hashes.append(previous)
    return hashes


class PagedKVCache:
    """K/V pools of ``num_blocks`` blocks shared by up to ``num_slots`` sequences of at most ``max_len`` tokens.

    Host bookkeeping (``lengths``, ``capacity``, ``rope_deltas``, ``cached_tokens``, block lists and
    reference counts, free lists, the prefix cache's hash map) is the truth the scheduler reads;
    ``lengths_dev`` and ``block_table`` mirror it on the device for the decode step (which advances
    ``lengths_dev`` itself).
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
        self.cached_tokens = [0] * num_slots  # leading tokens a slot found in the prefix cache
        self._blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self._free = list(range(num_slots))  # heaps: the lowest first keeps batches compact
        self._free_blocks = list(range(num_blocks))  # blocks holding nothing anyone may want
        self._refs = [0] * num_blocks  # slots using each block
        self._block_of: dict[bytes, int] = {}  # prefix hash -> the block holding those tokens
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self._holds: dict[int, tuple[int, int]] = {}  # slot -> (forks, fresh blocks per fork) held for fork()
        self._held_slots = 0
        self._held_blocks = 0

    # ---- sizing

    @staticmethod
    def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """K and V bytes one token takes over all layers."""
        text = _text_config(config)
        return kv_bytes_per_token(layers=text.num_hidden_layers, kv_heads=text.num_key_value_heads,
                                  head_dim=_head_dim(text), dtype_bytes=torch.empty((), dtype=dtype).element_size())

    @staticmethod
    def slot_bytes(max_len: int, block_size: int = BLOCK_SIZE) -> int:
        """Device bytes one slot takes beside the K/V pools: its block-table row (int32) and length (int64)."""
        return blocks_for(max_len, block_size) * 4 + 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # ---- slots and blocks

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_blocks(self) -> int:
        """Blocks a fresh allocation may take: empty ones and cached ones nobody uses."""
        return len(self._free_blocks) + len(self._evictable)

    def blocks_needed(self, tokens: int) -> int:
        return blocks_for(max(1, min(tokens, self.max_len)), self.block_size)

    def _cached_prefix(self, hashes: Sequence[bytes], limit: int) -> list[int]:
        blocks = []
        for h in hashes[:limit]:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def is_cached(self, block_hash: bytes) -> bool:
        """Whether a block holding the prompt this prefix hash describes is in the cache."""
        return block_hash in self._block_of

    def allocation_cost(self, tokens: int, hashes: Sequence[bytes] = ()) -> int:
        """How many of :attr:`free_blocks` an allocation of ``tokens`` with these prefix hashes would use."""
        need = self.blocks_needed(tokens)
        cost = need
        for h in hashes[:need]:
            block = self._block_of.get(h)
            if block is None:
                break
            cost -= self._refs[block] > 0  # a hit on an unused cached block takes it from free_blocks
        return cost

    def fork_blocks(self, tokens: int, prompt_tokens: int) -> int:
        """The fresh blocks one fork of a slot of ``tokens`` takes: all but the prompt's full blocks."""
        return self.blocks_needed(tokens) - prompt_tokens // self.block_size

    def can_allocate(self, tokens: int, hashes: Sequence[bytes] = (), forks: int = 0, prompt_tokens: int = 0) -> bool:
        held = self._held_blocks + forks * self.fork_blocks(tokens, prompt_tokens)
        return len(self._free) - self._held_slots > forks and \
            self.allocation_cost(tokens, hashes) + held <= self.free_blocks

    def fits_at_all(self, tokens: int, forks: int = 0, prompt_tokens: int = 0) -> bool:
        """Whether such an allocation fits the empty cache (else it would wait for ever)."""
        need = self.blocks_needed(tokens) + forks * self.fork_blocks(tokens, prompt_tokens)
        return forks < self.num_slots and need <= self.num_blocks

    def allocate(self, tokens: int | None = None, hashes: Sequence[bytes] = (), *, forks: int = 0,
                 prompt_tokens: int = 0) -> int | None:
        """The lowest free slot (now empty) with blocks for ``tokens`` (default: ``max_len``) reserved,
        or None when no slot or not enough blocks are free. ``hashes``: the prompt's leading block
        hashes that may be shared (:func:`prompt_block_hashes`, at most those before its last token);
        the cached ones come first in the slot, read-only, and ``cached_tokens[slot]`` says how many
        tokens they hold. ``forks``: hold that many more slots, and the blocks they need beyond the
        ``prompt_tokens`` prompt's full blocks, for :meth:`fork` once the prompt is written."""
        tokens = self.max_len if tokens is None else tokens
        if not self.can_allocate(tokens, hashes, forks, prompt_tokens):
            return None
        need = self.blocks_needed(tokens)
        shared = self._cached_prefix(hashes, need)
        for block in shared:
            self._evictable.pop(block, None)
        slot = self._take_slot(shared, need - len(shared))
        self.cached_tokens[slot] = len(shared) * self.block_size
        self._set_length(slot, 0)
        self.rope_deltas[slot] = 0
        if forks:
            per_fork = self.fork_blocks(tokens, prompt_tokens)
            self._holds[slot] = (forks, per_fork)
            self._held_slots += forks
            self._held_blocks += forks * per_fork
        return slot

    def _take_slot(self, shared: list[int], fresh: int) -> int:
        """The lowest free slot, holding ``shared`` blocks (one more user each) and ``fresh`` new ones."""
        for block in shared:
            self._refs[block] += 1
        blocks = shared + [self._take_block() for _ in range(fresh)]
        for block in blocks[len(shared):]:
            self._refs[block] = 1
        slot = heapq.heappop(self._free)
        self._blocks[slot] = blocks
        self.capacity[slot] = min(self.max_len, len(blocks) * self.block_size)
        self.cached_tokens[slot] = 0
        row = torch.full((self.max_blocks,), self.scratch_block, dtype=torch.int32)
        row[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_table[slot].copy_(row)
        return slot

    def _release_hold(self, slot: int) -> tuple[int, int]:
        forks, per_fork = self._holds.pop(slot, (0, 0))
        self._held_slots -= forks
        self._held_blocks -= forks * per_fork
        return forks, per_fork

    def fork(self, slot: int) -> list[int]:
        """The slots held for ``slot`` (allocate's ``forks``), each now holding the same prompt: its
        full blocks shared read-only, the partly filled last one copied. They decode on their own."""
        forks, per_fork = self._release_hold(slot)
        length = self.lengths[slot]
        full = length // self.block_size
        children = []
        for _ in range(forks):
            child = self._take_slot(self._blocks[slot][:full], per_fork)
            if length % self.block_size:  # the tokens in the parent's last, partly filled block
                start = full * self.block_size
                src = self.positions(slot, length)[start:].to(self.device)
                dst = self.positions(child, length)[start:].to(self.device)
                for pool in (*self.keys, *self.values):
                    pool.index_copy_(1, dst, pool[:, src])
            self._set_length(child, length)
            self.rope_deltas[child] = self.rope_deltas[slot]
            children.append(child)
        return children

    def _take_block(self) -> int:
        if self._free_blocks:
            return heapq.heappop(self._free_blocks)
        block, _ = self._evictable.popitem(last=False)  # the cached block unused the longest
        del self._block_of[self._hash_of.pop(block)]
        return block

    def register_prefix(self, slot: int, hashes: Sequence[bytes]) -> None:
        """The slot's first ``len(hashes)`` blocks now hold the prompt those hashes describe: later
        prompts that start the same way may share them (call once its prefill wrote them)."""
        for block, h in zip(self._blocks[slot], hashes):
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self._release_hold(slot)
        for block in self._blocks[slot]:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None  # kept for a prompt that starts the same way
                else:
                    heapq.heappush(self._free_blocks, block)
        self._blocks[slot] = []
        self.capacity[slot] = 0
        self.cached_tokens[slot] = 0
        # The table row keeps pointing at the old blocks until the slot is taken again: a step
        # still in flight for it finishes in stream order before anyone else writes them (and it
        # writes past the prompt, never into a block that may be shared).
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
