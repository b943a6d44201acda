"""Prefill of one Qwen3-VL prompt straight into its slot of the paged cache: image by image, then
the text in chunks.

transformers' forward runs every image of a batch through the vision tower at once and the whole
prompt through the decoder at once, so its activation peak grows with the images and the prompt
length, and it launches ~40 small kernels a layer from Python. Here:

- each image goes through the vision tower alone (attention is per image anyway), so the peak is
  that of one image of ``max_pixels``, and no block waits for the device;
- the decoder runs over chunks of ``chunk`` tokens with the decode step's own layer code (fused
  q/k/v and gate/up weights, ~20 kernels a layer): each chunk's K/V go into the slot's blocks, then
  its queries attend to the slot's tokens so far (gathered from the blocks, causal within the
  chunk), so the peak is that of one chunk whatever the prompt's length;
- DeepStack adds the image features of the vision tower's early layers to the first decoder layers'
  hidden states at the image tokens, as ``Qwen3VLTextModel`` does.

It computes what ``Qwen3VLForConditionalGeneration.forward`` computes (tests compare logits and K/V
with transformers).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

from service.decode.qwen3_step import Qwen3VLDecoder, add_rms_norm, qk_norm_rotary, silu_mul
from service.sizing import PREFILL_CHUNK


class Qwen3VLPrefill:
    """``prefill(slot, ...)`` fills an allocated slot of the decoder's cache with a prompt and returns
    the next-token logits (float32 ``[vocab]``)."""

    def __init__(self, model: Any, decoder: Qwen3VLDecoder, chunk: int = PREFILL_CHUNK):
        if chunk < 1:
            raise ValueError("the prefill chunk needs at least one token")
        self.model = model
        self.decoder = decoder
        self.cache = decoder.cache
        self.chunk = chunk
        self.visual = model.model.visual
        self.image_token_id = model.config.image_token_id

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                      skip: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image features ``[tokens, hidden]`` and DeepStack features (one such tensor per DeepStack
        layer), one image at a time, for the images after the first ``skip``. ``grid_thw`` is the
        processor's ``[images, 3]`` on the host; ``pixel_values`` holds the patches of all of them."""
        embeds, deepstack = [], []
        start = 0
        for index, (t, h, w) in enumerate(grid_thw.tolist()):
            patches = t * h * w
            if index >= skip:
                image, features = self._encode_image(pixel_values[start:start + patches], grid_thw[index:index + 1])
                embeds.append(image)
                deepstack.append(features)
            start += patches
        return torch.cat(embeds), [torch.cat(layer) for layer in zip(*deepstack)]

    def _encode_image(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``Qwen3VLVisionModel.forward`` for one image, over the same modules. transformers' version
        splits attention per image with a host read of the lengths in every block (the host then
        waits for the device 24 times); with one image there is nothing to split."""
        visual = self.visual
        device = pixels.device
        # Positions from the grid (host): interpolated learned embeddings and the 2D rotary.
        indices, weights = qwen3_vl.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        position_ids = qwen3_vl.get_vision_position_ids(grid, visual.spatial_merge_size).to(device, non_blocking=True)
        hidden = visual.patch_embed(pixels)
        pos = visual.pos_embed(indices.to(device, non_blocking=True)) * weights.to(device, non_blocking=True)[:, :, None]
        hidden = hidden + pos.sum(1).to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        patches = hidden.shape[0]
        deepstack = []
        for number, block in enumerate(visual.blocks):
            attn = block.attn
            qkv = attn.qkv(block.norm1(hidden)).view(patches, 3, attn.num_heads, -1)
            q, k, v = qkv.unbind(1)
            q, k = qwen3_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], scale=attn.scaling)
            hidden = hidden + attn.proj(out[0].transpose(0, 1).reshape(patches, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
            if number in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(number)]
                deepstack.append(merger(hidden))
        return visual.merger(hidden), deepstack

    @torch.no_grad()
    def prefill(self, slot: int, input_ids: torch.Tensor, mrope_positions: torch.Tensor | None = None,
                rope_delta: int = 0, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Write the prompt's K/V into ``slot`` (allocated, with room for it) and return the logits
        after its last token. ``input_ids`` ``[T]`` and ``mrope_positions`` ``[3, T]`` (None: text
        positions 0..T-1) and ``image_grid_thw`` are host tensors; ``pixel_values`` (the processor's
        patches of every image, in order) may be on either side. The slot's first
        ``cache.cached_tokens[slot]`` tokens came from the prefix cache: they are not computed again,
        nor are the images whose tokens all lie among them."""
        cache, decoder = self.cache, self.decoder
        device = cache.device
        length = int(input_ids.shape[0])
        physical = cache.positions(slot, length).to(device, non_blocking=True)  # checks the reservation
        cached = cache.cached_tokens[slot]
        if not 0 <= cached < length:
            raise ValueError(f"{cached} cached tokens leave nothing to compute of a {length}-token prompt")
        if mrope_positions is None:
            mrope_positions = torch.arange(length).expand(3, length)
        is_image = input_ids == self.image_token_id
        before = torch.cumsum(is_image, 0) - is_image.long()  # image tokens before each position (host)
        images = deepstack = None
        skipped_tokens = 0
        if pixel_values is not None and image_grid_thw is not None and bool(is_image[cached:].any()):
            # Images whose tokens all come before `cached` are skipped (their tokens are cached).
            per_image = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
            skip = 0
            while skip < len(per_image) and skipped_tokens + per_image[skip] <= int(before[cached]):
                skipped_tokens += per_image[skip]
                skip += 1
            pixels = pixel_values.to(device, self.visual.patch_embed.proj.weight.dtype, non_blocking=True)
            images, deepstack = self.encode_images(pixels, image_grid_thw, skip)
        ids_dev = input_ids.to(device, non_blocking=True)
        mrope_dev = mrope_positions.to(device, non_blocking=True)
        logits = None
        for start in range(cached, length, self.chunk):
            end = min(length, start + self.chunk)
            hidden = decoder.embed_tokens(ids_dev[start:end])
            image_rows = None
            if images is not None and bool(is_image[start:end].any()):
                # Index lists made on the host: boolean masks on the device would make it wait.
                at = is_image[start:end].nonzero()[:, 0].to(device, non_blocking=True)
                first = int(before[start]) - skipped_tokens
                image_rows = (at, first, first + int(at.shape[0]))
                hidden.index_copy_(0, at, images[first:image_rows[2]].to(hidden.dtype))
            normed = self._layers(hidden, mrope_dev[:, start:end], physical, start, end, image_rows, deepstack)
            if end == length:
                logits = decoder.lm_head(normed[-1:]).float()[0]
        cache.set_prefilled(slot, length, rope_delta)
        return logits

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, physical: torch.Tensor, start: int, end: int,
                image_rows, deepstack) -> torch.Tensor:
        """The decoder over tokens ``start..end-1`` of the slot; returns the final-normed hidden states."""
        decoder, cache = self.decoder, self.cache
        heads, kv_heads, dim = decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
        tokens = end - start
        cos, sin = decoder.rotary_emb(hidden, positions[:, None, :])  # [1, C, D]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [C, 1, D]: broadcast over heads
        signed_sin = torch.cat([-sin[..., :dim // 2], sin[..., dim // 2:]], dim=-1)
        written, seen = physical[start:end], physical[:end]
        mask = None
        if start > 0:  # causal for the chunk's queries, over everything before it too
            mask = (torch.arange(end, device=hidden.device)[None, :]
                    <= torch.arange(start, end, device=hidden.device)[:, None])
        first = decoder.layers[0].input_layernorm
        normed = F.rms_norm(hidden, hidden.shape[-1:], first.weight, first.variance_epsilon)
        for index, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            qk, value = decoder._qk_v(index, layer, normed)
            qk = qk_norm_rotary(qk, decoder.qk_norm_weights[index], cos, signed_sin, attn.q_norm.variance_epsilon)
            keys, values = cache.keys[index], cache.values[index]
            keys.index_copy_(1, written, qk[:, heads:].transpose(0, 1).to(keys.dtype))
            values.index_copy_(1, written, value.transpose(0, 1).to(values.dtype))
            # [1, H, C, D] queries over [1, H, end, D] keys (each KV head repeated for its query heads)
            query = qk[:, :heads].transpose(0, 1)[None]
            groups = heads // kv_heads
            past_k = keys[:, seen].repeat_interleave(groups, dim=0)[None]
            past_v = values[:, seen].repeat_interleave(groups, dim=0)[None]
            out = F.scaled_dot_product_attention(query, past_k, past_v, attn_mask=mask, is_causal=mask is None,
                                                 scale=decoder.scaling)
            post = layer.post_attention_layernorm
            hidden, normed = add_rms_norm(hidden, attn.o_proj(out[0].transpose(0, 1).reshape(tokens, heads * dim)),
                                          post.weight, post.variance_epsilon)
            following = decoder.layers[index + 1].input_layernorm if index + 1 < len(decoder.layers) else decoder.norm
            update = decoder._mlp(index, layer, normed, silu_mul)
            if image_rows is not None and index < len(deepstack):
                at, first_image, last_image = image_rows
                hidden = (hidden + update).index_add_(0, at, deepstack[index][first_image:last_image].to(hidden.dtype))
                normed = F.rms_norm(hidden, hidden.shape[-1:], following.weight, following.variance_epsilon)
            else:
                hidden, normed = add_rms_norm(hidden, update, following.weight, following.variance_epsilon)
        return normed
