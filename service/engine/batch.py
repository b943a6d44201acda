"""The running batch on the device: its rows' slots in the paged KV cache, their prefill and decode step.

The one place that touches the KV cache. The scheduler asks whether queued requests fit
(`admission`), prefills them into the batch (`admit`), decodes every row a step (`decode`) and
keeps or frees rows (`keep`, `release`); it never sees slots or blocks.

Each prompt is prefilled on its own by service.decode's Qwen3-VL prefill, straight into the blocks
its slot reserved (image by image, then the text in chunks: the activation peak is that of one
image and one chunk); decode steps are replayed from CUDA graphs on CUDA. Rows keep their order:
joining rows come after the running ones, and a row's index is its place in ``slots``.
"""
from __future__ import annotations

import torch

from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder, Qwen3VLPrefill
from service.engine.requests import GenerationRequest


class Admission:
    """One scheduling round's view of the free slots and blocks, as queued requests are taken in order."""

    def __init__(self, cache: PagedKVCache):
        self._cache = cache
        self.slots = cache.free_slots
        self.blocks = cache.free_blocks
        self._registered_soon: set[bytes] = set()  # prefix blocks the requests taken before will register

    def take(self, request: GenerationRequest) -> bool:
        """Count the request in, if a slot and the blocks for its prompt and max_tokens are free
        (blocks it finds in the prefix cache, or that an earlier one will register, cost nothing)."""
        if self.slots <= 0:
            return False
        prompt = request.prompt
        need = self._cache.allocation_cost(request.reserve, prompt.shareable_hashes, self._registered_soon)
        if need > self.blocks:
            return False
        self.slots -= 1
        self.blocks -= need
        self._registered_soon |= set(prompt.block_hashes)
        return True


class Batch:
    def __init__(self, runner: DecodeRunner, prefiller: Qwen3VLPrefill, reserved_ceiling: int | None = None):
        """reserved_ceiling: torch's reserved bytes above which the allocator hands cached blocks back
        after a prefill (prefills of changing shapes grow its share beyond what the budget counts)."""
        self.runner = runner
        self.cache = runner.cache
        self.prefiller = prefiller
        self.slots: list[int] = []
        self._reserved_ceiling = reserved_ceiling

    @classmethod
    def over(cls, model, cache: PagedKVCache, **runner_options) -> "Batch":
        """A batch decoding ``model`` from ``cache`` with eager steps (tests and tools; the engine's
        start-up builds its own with compiled steps and CUDA graphs)."""
        decoder = Qwen3VLDecoder(model, cache)
        return cls(DecodeRunner(decoder, **runner_options), Qwen3VLPrefill(model, decoder))

    @property
    def size(self) -> int:
        return len(self.slots)

    def admission(self) -> Admission:
        return Admission(self.cache)

    def admit(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, int]:
        """Prefill ``requests`` into free slots, in order while they fit, as rows after the running
        ones. Returns the logits after each admitted prompt ``[n, vocab]`` and the prompt tokens taken
        from the prefix cache. Fewer than asked may fit (a cached block they counted on went to an
        earlier one's fresh blocks): the caller queues the rest again. On an error nothing is added."""
        cache = self.cache
        slots, logits, cached = [], [], 0
        try:
            for request in requests:
                prompt = request.prompt
                slot = cache.allocate(request.reserve, prompt.shareable_hashes)
                if slot is None:
                    break
                slots.append(slot)
                cached += cache.cached_tokens[slot]
                logits.append(self.prefiller.prefill(slot, prompt.input_ids, prompt.mrope_positions, prompt.rope_delta,
                                                     prompt.pixel_values, prompt.image_grid_thw))
                cache.register_prefix(slot, prompt.block_hashes)
            if not slots:
                raise RuntimeError(f"no room in the KV cache for {len(requests)} request(s) counted in")
        except BaseException:
            for slot in slots:
                cache.free(slot)
            raise
        finally:
            self._trim_allocator()
        self.slots += slots
        return torch.stack(logits), cached

    def decode(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token per row (host ints, or the previous step's tokens still on the device);
        the next-token logits ``[rows, vocab]``."""
        return self.runner.decode(self.slots, tokens)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); free the others' slots and blocks."""
        kept = [self.slots[i] for i in rows]
        for slot in set(self.slots) - set(kept):
            self.cache.free(slot)
        self.slots = kept

    def release(self) -> None:
        self.keep([])

    def _trim_allocator(self) -> None:
        if self._reserved_ceiling is not None and torch.cuda.memory_reserved(self.cache.device) > self._reserved_ceiling:
            torch.cuda.empty_cache()
