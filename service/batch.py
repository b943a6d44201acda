"""The running batch on the device: its rows' KV cache, positions and decode step.

Rows join between decode steps (their prompts are prefilled, then join the running rows) and
leave between steps. Positions are explicit per row, so padding never shifts a row's rotary
positions; for Qwen-VL's 3D "mrope" each row keeps its own rope delta (the offset between its text
position and its mrope position after the images).

Everything that touches the KV cache lives here, behind one small interface the scheduler uses
(`prefill`, `decode`, `merge`, `keep`, `release`, `lengths`), in two kinds:

- SlotBatch: Qwen3-VL models. Rows live in slots of a paged KV cache (service.decode); prompts are
  prefilled one by one by our own prefill, and each decode step is our own step, replayed from
  CUDA graphs on CUDA. The fast path.
- KVBatch: any other model transformers loads: its own forward over a growing DynamicCache, the
  prompts prefilled together as one left-padded forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from service.decode import BLOCK_SIZE, DecodeRunner
from service.decode.qwen3_prefill import Qwen3VLPrefill

Forward = Callable[..., object]


@dataclass
class Prompt:
    """One tokenized prompt, on the CPU, ready to prefill."""

    input_ids: torch.Tensor  # [L] long
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # processor outputs: pixel_values, image_grid_thw, ...
    token_extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token [L] outputs: mm_token_type_ids
    mrope_positions: torch.Tensor | None = None  # [3, L] for Qwen-VL models, else None
    rope_delta: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # per full KV block, for the prefix cache

    @property
    def shareable_hashes(self) -> list[bytes]:
        """The block hashes a prefill may take from the cache: at least its last token is computed
        (its logits give the first new token)."""
        return self.block_hashes[:(self.length - 1) // BLOCK_SIZE]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class RopeLayout:
    """How a model wants its position ids: Qwen3-VL's [4, B, L] (text row + 3D mrope) or plain [B, L]."""

    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "model", None)
        get_rope_index = getattr(inner, "get_rope_index", None)
        self.mrope = get_rope_index is not None
        if self.mrope:
            import inspect

            if "mm_token_type_ids" not in inspect.signature(get_rope_index).parameters:
                raise ValueError(
                    f"{type(model).__name__} uses multimodal rope without mm_token_type_ids (an older Qwen-VL): "
                    "this engine drives the Qwen3-VL family and models with plain positions"
                )
            self._get_rope_index = get_rope_index

    def prompt_positions(self, input_ids: torch.Tensor, extras: dict, token_extras: dict) -> tuple[torch.Tensor | None, int]:
        """3D positions [3, L] and the rope delta of one prompt (CPU work; no weights touched)."""
        if not self.mrope:
            return None, 0
        grid = extras.get("image_grid_thw")
        if grid is None:
            return None, 0  # text only: the 3 rows equal the text positions
        with torch.no_grad():
            positions, delta = self._get_rope_index(
                input_ids[None], mm_token_type_ids=token_extras["mm_token_type_ids"][None], image_grid_thw=grid,
            )
        return positions[:, 0], int(delta.reshape(-1)[0])

    def position_ids(self, text: torch.Tensor, mrope: torch.Tensor) -> torch.Tensor:
        """text [B, L] and mrope [3, B, L] -> what the model's forward takes."""
        if not self.mrope:
            return text
        return torch.cat([text[None], mrope], dim=0)


def padded_forward(forward: Forward, layout: RopeLayout, device: torch.device, text_config,
                   prompts: list[Prompt], pad_id: int):
    """Run the prompts as one left-padded forward with a fresh cache; return (output, attention mask [n, T])."""
    n, width = len(prompts), max(p.length for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    text_pos = torch.zeros((n, width), dtype=torch.long)
    mrope = torch.zeros((3, n, width), dtype=torch.long)
    token_extras = {k: torch.zeros((n, width), dtype=v.dtype) for k, v in prompts[0].token_extras.items()}
    for i, p in enumerate(prompts):
        start = width - p.length
        input_ids[i, start:] = p.input_ids
        mask[i, start:] = 1
        text_pos[i, start:] = torch.arange(p.length)
        mrope[:, i, start:] = p.mrope_positions if p.mrope_positions is not None else torch.arange(p.length)
        for k, v in p.token_extras.items():
            token_extras.setdefault(k, torch.zeros((n, width), dtype=v.dtype))[i, start:] = v
    extras: dict[str, torch.Tensor] = {}
    for key in {k for p in prompts for k in p.extras}:
        parts = [p.extras[key] for p in prompts if key in p.extras]
        extras[key] = torch.cat(parts, dim=0)
    kwargs = {k: v.to(device) for k, v in {**extras, **token_extras}.items()}
    out = forward(
        input_ids=input_ids.to(device), attention_mask=mask.to(device),
        position_ids=layout.position_ids(text_pos, mrope).to(device),
        past_key_values=DynamicCache(config=text_config), use_cache=True, logits_to_keep=1, **kwargs,
    )
    return out, mask


class KVBatch:
    """Rows' KV cache, attention mask and next positions; rows keep their order.

    transformers' own forward decodes (any architecture it loads); the cache grows each step.
    """

    def __init__(self, forward: Forward, layout: RopeLayout, device: torch.device, cache: DynamicCache,
                 mask: torch.Tensor, next_pos: torch.Tensor, rope_delta: torch.Tensor):
        self._forward = forward
        self._layout = layout
        self.device = device
        self.cache = cache
        self.mask = mask  # [B, T] long, 0 = padding
        self.next_pos = next_pos  # [B] text position of each row's next token
        self.rope_delta = rope_delta  # [B]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def prefill(cls, forward: Forward, layout: RopeLayout, device: torch.device, text_config,
                prompts: list[Prompt], pad_id: int) -> tuple["KVBatch", torch.Tensor]:
        """Run the prompts as one left-padded forward; return their batch and last-token logits [n, V]."""
        out, mask = padded_forward(forward, layout, device, text_config, prompts, pad_id)
        batch = cls(forward, layout, device, out.past_key_values, mask.to(device),
                    torch.tensor([p.length for p in prompts], device=device),
                    torch.tensor([p.rope_delta for p in prompts], device=device))
        return batch, out.logits[:, -1]

    def lengths(self) -> list[int]:
        """Tokens each row holds (its prompt and what it has been fed since)."""
        return self.next_pos.tolist()

    def decode(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; return next-token logits [B, V]."""
        tokens = torch.as_tensor(tokens, device=self.device)
        b = self.size
        self.mask = torch.cat([self.mask, self.mask.new_ones((b, 1))], dim=1)
        text = self.next_pos[:, None]
        mrope = (self.next_pos + self.rope_delta)[None, :, None].expand(3, b, 1)
        out = self._forward(
            input_ids=tokens[:, None], attention_mask=self.mask,
            position_ids=self._layout.position_ids(text, mrope),
            past_key_values=self.cache, use_cache=True, logits_to_keep=1,
        )
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]

    def merge(self, other: "KVBatch") -> None:
        """Append `other`'s rows (after self's), left padding the shorter cache."""
        width = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.rope_delta = torch.cat([self.rope_delta, other.rope_delta])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); drop the padding columns nobody needs any more."""
        index = torch.tensor(rows, device=self.device, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        cut = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, cut:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]
        self.next_pos = self.next_pos.index_select(0, index)
        self.rope_delta = self.rope_delta.index_select(0, index)

    def release(self) -> None:
        """Drop every row (the cache is freed with the object)."""


class SlotBatch:
    """Rows held in the slots of a paged KV cache, decoded by a DecodeRunner (CUDA graphs on CUDA).

    Each prompt is prefilled on its own by service.decode's Qwen3-VL prefill, straight into the
    blocks its slot reserved (image by image, then the text in chunks: the activation peak is that
    of one image and one chunk). Joining and leaving only move slot numbers.
    """

    def __init__(self, runner: DecodeRunner, slots: list[int]):
        self.runner = runner
        self.slots = slots

    @property
    def size(self) -> int:
        return len(self.slots)

    @classmethod
    def prefill(cls, runner: DecodeRunner, model, prompts: list[Prompt],
                reserve: list[int] | None = None) -> tuple["SlotBatch", torch.Tensor]:
        """Prefill the prompts into free slots, each reserving ``reserve[i]`` tokens (its prompt and
        the tokens it may generate; default: the whole context); return the batch and the logits
        ``[n, vocab]`` after each prompt. Leading blocks found in the prefix cache are shared, not
        computed; each prompt's own full blocks are registered there once written. Prompts are taken
        in order while they fit (the caller checked, but a cached block it counted on may have been
        evicted by the fresh blocks of an earlier one): the batch may hold fewer rows than prompts."""
        cache = runner.cache
        prefiller = Qwen3VLPrefill(model, runner.decoder)
        reserve = reserve or [cache.max_len] * len(prompts)
        batch = cls(runner, [])
        logits = []
        try:
            for prompt, tokens in zip(prompts, reserve):
                slot = cache.allocate(tokens, prompt.shareable_hashes)
                if slot is None:
                    break
                batch.slots.append(slot)
                logits.append(prefiller.prefill(slot, prompt.input_ids, prompt.mrope_positions, prompt.rope_delta,
                                                prompt.extras.get("pixel_values"), prompt.extras.get("image_grid_thw")))
                cache.register_prefix(slot, prompt.block_hashes)
        except BaseException:
            batch.release()
            raise
        if not logits:
            raise RuntimeError(f"no room in the KV cache for {len(prompts)} prompts")
        return batch, torch.stack(logits)

    def lengths(self) -> list[int]:
        return [self.runner.cache.lengths[s] for s in self.slots]

    def decode(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B] (host ints travel in the runner's one staging copy); return logits [B, V]."""
        return self.runner.decode(self.slots, tokens)

    def merge(self, other: "SlotBatch") -> None:
        self.slots += other.slots
        other.slots = []

    def keep(self, rows: list[int]) -> None:
        kept = [self.slots[i] for i in rows]
        for slot in set(self.slots) - set(kept):
            self.runner.cache.free(slot)
        self.slots = kept

    def release(self) -> None:
        for slot in self.slots:
            self.runner.cache.free(slot)
        self.slots = []


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Left pad dim -2 of a KV tensor [B, H, T, D], or dim 1 of a mask [B, T], with zeros."""
    if x.dim() == 2:
        missing = width - x.shape[1]
        return x if missing == 0 else torch.cat([x.new_zeros((x.shape[0], missing)), x], dim=1)
    missing = width - x.shape[-2]
    if missing == 0:
        return x
    pad = x.new_zeros((*x.shape[:-2], missing, x.shape[-1]))
    return torch.cat([pad, x], dim=-2)
