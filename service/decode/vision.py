"""Qwen3-VL's vision tower over several images at once, without waiting for the device.

The tower's launches, not its arithmetic, bound one image on a fast GPU (a 1280x704 image: ~600
kernels, 15-25 ms of host time for ~5 ms of device work, H200): images of several prompts go
through it together, up to ``batch_tokens`` merged tokens a forward, so a wave of image requests
pays the launches once per batch. Everything but attention is per patch, so the batch's patches are
simply concatenated; attention stays within each image: runs of images with the same patch count
go to one ``scaled_dot_product_attention`` call as its batch dimension (the usual case: a burst of
same-size images is one call a block), others one call each. transformers' forward splits
attention with a host read of the lengths in every block; here the lengths come from the grids,
which are on the host already.

What else a forward's device time went to (four 1280x704 images, 59 ms on an H200): the pixels'
copy from pageable memory (13 ms, the host blocked), now staged in a pinned buffer and copied
asynchronously; the rotary embedding's float32 chains (11 ms in ~10 kernels a block); the patch
embedding's Conv3d (2.4 ms in a generic convolution kernel), whose kernel equals its stride, so it
is one matmul. Where the engine compiles (``compile_backend``), each block's work before and after
attention (norms, projections, the rotary's chains, GELU, residuals) is one compiled graph for every
block, patch count and batch (~4000 eager torch calls a forward before; H200 host, 2B: four
1280x704 images one forward each 114 -> 92 ms, four in one forward 57 -> 46 ms). Compiling the whole
tower as one graph took ~170 s at start-up and its memory went past the plan: not done.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

Features = tuple[torch.Tensor, list[torch.Tensor]]  # merged embeddings [tokens, hidden], one DeepStack tensor per layer


class VisionEncoder:
    def __init__(self, visual: Any, batch_tokens: int | None = None, compile_backend: str | None = None):
        """``visual``: the model's ``Qwen3VLVisionModel``; ``batch_tokens``: merged tokens one forward
        holds at most (the engine's memory plan measured a batch that large); a larger image goes alone.
        None: every image given to one ``encode`` call in one forward. ``compile_backend`` (e.g.
        ``"inductor"``, CUDA): each block's work before and after attention compiled, for any patch
        count and every block (at its first use)."""
        self.visual = visual
        self.batch_tokens = batch_tokens
        self.merge = visual.spatial_merge_size ** 2  # patches per merged token
        proj = visual.patch_embed.proj
        self.dtype = proj.weight.dtype
        self.device = proj.weight.device
        # Conv3d with kernel == stride over one patch each: the patch's values times the flattened kernel.
        self._embed_weight = proj.weight.detach().reshape(proj.out_channels, -1)
        self._embed_bias = proj.bias.detach() if proj.bias is not None else None
        self._before_attention, self._after_attention = before_attention, after_attention
        if compile_backend:  # one graph each for every block (their weights are its inputs) and patch count
            self._before_attention, self._after_attention = (
                _patches_dynamic(torch.compile(f, backend=compile_backend, fullgraph=True))
                for f in (before_attention, after_attention))
        self._staging: torch.Tensor | None = None  # pinned host buffer of a batch's patches (CUDA)
        self._staged: Any = None  # the event after its last copy to the device

    def tokens(self, grid: torch.Tensor) -> list[int]:
        """Merged tokens of each image of a host grid ``[images, 3]``."""
        return (grid.prod(-1) // self.merge).tolist()

    def encode(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Features]:
        """The features of each ``(pixels [patches, C], grid [1, 3] on the host)``, in order, in
        forwards of up to ``batch_tokens`` tokens (images in order, each batch as many as fit)."""
        out: list[Features] = []
        batch: list[tuple[torch.Tensor, torch.Tensor]] = []
        held = 0
        for pixels, grid in images:
            tokens = int(grid.prod()) // self.merge
            if batch and self.batch_tokens is not None and held + tokens > self.batch_tokens:
                out += self._forward(batch)
                batch, held = [], 0
            batch.append((pixels, grid))
            held += tokens
        if batch:
            out += self._forward(batch)
        return out

    def _forward(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Features]:
        """``Qwen3VLVisionModel.forward`` over these images' patches concatenated, attention per image."""
        visual, device = self.visual, self.device
        grid = torch.cat([g for _, g in images])
        pixels = self._to_device([p for p, _ in images])
        # Positions from the grids (host): interpolated learned embeddings and the 2D rotary.
        indices, weights = qwen3_vl.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        position_ids = qwen3_vl.get_vision_position_ids(grid, visual.spatial_merge_size).to(device, non_blocking=True)
        hidden = F.linear(pixels, self._embed_weight, self._embed_bias)
        weights = weights.to(device, non_blocking=True)[:, :, None]
        pos = visual.pos_embed(indices.to(device, non_blocking=True)) * weights
        hidden = hidden + pos.sum(1).to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        runs = _equal_runs(grid.prod(-1).tolist())
        patches = hidden.shape[0]
        deepstack = []
        for number, block in enumerate(visual.blocks):
            q, k, v = self._before_attention(block, hidden, cos, sin)
            scale = block.attn.scaling
            if len(runs) == 1:
                out = _attention(q, k, v, *runs[0], scale)
            else:  # each run's output into its rows of one tensor (no second copy of all of them)
                out = q.new_empty(patches, q.shape[1] * q.shape[2])
                for start, count, length in runs:
                    out[start:start + count * length] = _attention(q, k, v, start, count, length, scale)
            # detach(): not a view (whether it is one depends on the attention backend's layout and the
            # image count), so the compiled graph's guards on a view's base never ask for another one.
            hidden = self._after_attention(block, hidden, out.detach())
            if number in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(number)]
                deepstack.append(merger(hidden))
        merged = visual.merger(hidden)
        if len(images) == 1:
            return [(merged, deepstack)]
        sizes = self.tokens(grid)
        per_layer = [layer.split(sizes) for layer in deepstack]
        return [(embeds, [layer[i] for layer in per_layer]) for i, embeds in enumerate(merged.split(sizes))]

    def _to_device(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The images' patches ``[patches, C]`` on the device in the tower's dtype. From the host on
        CUDA: through a pinned buffer (kept for the next batch), so the copy does not block the host."""
        if self.device.type != "cuda" or any(p.device.type != "cpu" for p in pixels):
            joined = torch.cat(pixels) if len(pixels) > 1 else pixels[0]
            return joined.to(self.device, self.dtype, non_blocking=True)
        rows, width = sum(p.shape[0] for p in pixels), pixels[0].shape[1]
        if self._staged is not None:
            self._staged.synchronize()  # the previous batch's patches have left the buffer
        if self._staging is None or self._staging.numel() < rows * width:
            self._staging = torch.empty(rows * width, dtype=self.dtype, pin_memory=True)
        host = self._staging[:rows * width].view(rows, width)
        start = 0
        for p in pixels:
            host[start:start + p.shape[0]].copy_(p)  # casts to the tower's dtype where the processor's differs
            start += p.shape[0]
        on_device = host.to(self.device, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record(torch.cuda.current_stream(self.device))
        return on_device


def _patches_dynamic(compiled):
    """``compiled(block, *tensors)`` with the tensors' first dimension (the patches) dynamic and every
    other one static. (With ``dynamic=True`` a first patch count equal to the hidden size or the head
    dimension shared their symbol, and the graph held for that count only.)"""
    def call(block: Any, *tensors: torch.Tensor):
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(block, *tensors)
    return call


def before_attention(block: Any, hidden: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``Qwen3VLVisionBlock``'s norm1, q/k/v projection and 2D rotary: q, k, v ``[patches, heads, D]``."""
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(hidden)).view(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
    q, k = qwen3_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q, k, v


def after_attention(block: Any, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The rest of the block: the attention's output projection, the residuals, norm2 and the MLP."""
    hidden = hidden + block.attn.proj(out)
    return hidden + block.mlp(block.norm2(hidden))


def _equal_runs(patch_counts: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive images of the same patch count as ``(first patch, images, patches each)``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for count in patch_counts:
        if runs and runs[-1][2] == count:
            first, images, _ = runs[-1]
            runs[-1] = (first, images + 1, count)
        else:
            runs.append((start, 1, count))
        start += count
    return runs


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, images: int, length: int,
               scale: float) -> torch.Tensor:
    """Attention of ``images`` images of ``length`` patches each, from patch ``start`` of ``q, k, v``
    ``[patches, heads, D]``: one call, the images as its batch. Returns ``[images * length, heads * D]``."""
    end = start + images * length

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x[start:end].view(images, length, x.shape[1], x.shape[2]).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=scale)
    return out.transpose(1, 2).reshape(images * length, q.shape[1] * q.shape[2])
