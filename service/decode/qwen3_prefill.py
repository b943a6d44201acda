"""Prefill of Qwen3-VL prompts straight into their slots of the paged cache, in passes of a bounded
number of tokens that may pack pieces of several prompts.

transformers' forward runs every image of a batch through the vision tower at once and the whole
prompt through the decoder at once, so its activation peak grows with the images and the prompt
length, and it launches ~40 small kernels a layer from Python. Here:

- a prompt is a :class:`PrefillJob`; a pass (:meth:`Qwen3VLPrefill.run`) takes the next pieces of
  the jobs, in order, up to ``chunk`` tokens in all (a long prompt spans several passes, short ones
  share one), so the decoder's activations are those of one chunk whatever the prompts' lengths,
  and the caller can run decode steps between passes (nobody waits for a whole wave of prefills);
- the pieces of one pass go through the decoder together, with the decode step's own layer code
  (fused q/k/v and gate/up weights): projections, norms and the MLP once for all of them, attention
  per piece over its own slot's tokens so far (gathered from the blocks, causal within the piece);
- each image goes through the vision tower alone (attention is per image anyway), when its
  prompt's first piece that holds image tokens comes; no block waits for the device;
- DeepStack adds the image features of the vision tower's early layers to the first decoder layers'
  hidden states at the image tokens, as ``Qwen3VLTextModel`` does.

It computes what ``Qwen3VLForConditionalGeneration.forward`` computes (tests compare logits and K/V
with transformers, for one prompt and for pieces of several packed in one pass).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

from service.decode.qwen3_step import Qwen3VLDecoder, add_rms_norm, qk_norm_rotary, silu_mul
from service.sizing import PREFILL_CHUNK


class PrefillJob:
    """One prompt on its way into an allocated slot: what is computed so far, its images once encoded.

    ``input_ids`` ``[T]``, ``mrope_positions`` ``[3, T]`` (None: text positions 0..T-1) and
    ``image_grid_thw`` are host tensors; ``pixel_values`` (the processor's patches of every image,
    in order) may be on either side. The slot's first ``cache.cached_tokens[slot]`` tokens came
    from the prefix cache: they are not computed again, nor are the images whose tokens all lie
    among them. ``block_hashes``: the prompt's full blocks' prefix hashes, registered in the cache
    once they are written. ``owner``: whatever the caller keeps with the job (the scheduler's sequence)."""

    def __init__(self, prefill: "Qwen3VLPrefill", slot: int, input_ids: torch.Tensor,
                 mrope_positions: torch.Tensor | None = None, rope_delta: int = 0,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 block_hashes: list[bytes] = (), owner: Any = None):
        cache = prefill.cache
        device = cache.device
        self.slot, self.owner, self.rope_delta, self.block_hashes = slot, owner, rope_delta, list(block_hashes)
        self.length = int(input_ids.shape[0])
        self.physical = cache.positions(slot, self.length).to(device, non_blocking=True)  # checks the reservation
        self.done = cache.cached_tokens[slot]
        if not 0 <= self.done < self.length:
            raise ValueError(f"{self.done} cached tokens leave nothing to compute of a {self.length}-token prompt")
        if mrope_positions is None:
            mrope_positions = torch.arange(self.length).expand(3, self.length)
        self.ids = input_ids.to(device, non_blocking=True)
        self.mrope = mrope_positions.to(device, non_blocking=True)
        self.is_image = input_ids == prefill.image_token_id  # host
        self.before = torch.cumsum(self.is_image, 0) - self.is_image.long()  # image tokens before each position
        self._pixels, self._grid = pixel_values, image_grid_thw
        self.images: torch.Tensor | None = None  # features of the images after the skipped ones
        self.deepstack: list[torch.Tensor] = []
        self.skipped_tokens = 0  # image tokens of the images wholly in the cached prefix
        self.logits: torch.Tensor | None = None  # float32 [vocab], once the last token is computed

    @property
    def remaining(self) -> int:
        return self.length - self.done

    @property
    def finished(self) -> bool:
        return self.done >= self.length

    @property
    def holds_images(self) -> bool:
        """Has (or will have) image features to keep until its last piece."""
        return self._grid is not None and self._pixels is not None and bool(self.is_image[self.done:].any())

    def image_count(self) -> int:
        return 0 if self._grid is None else int(self._grid.shape[0])


class Qwen3VLPrefill:
    """Fills allocated slots of the decoder's cache with prompts: ``run(jobs)`` one pass at a time,
    or ``prefill(slot, ...)`` for one whole prompt (its next-token logits, float32 ``[vocab]``)."""

    def __init__(self, model: Any, decoder: Qwen3VLDecoder, chunk: int = PREFILL_CHUNK):
        if chunk < 1:
            raise ValueError("the prefill chunk needs at least one token")
        self.model = model
        self.decoder = decoder
        self.cache = decoder.cache
        self.chunk = chunk
        self.visual = model.model.visual
        self.image_token_id = model.config.image_token_id

    def job(self, slot: int, input_ids: torch.Tensor, mrope_positions: torch.Tensor | None = None,
            rope_delta: int = 0, pixel_values: torch.Tensor | None = None,
            image_grid_thw: torch.Tensor | None = None, block_hashes: list[bytes] = (),
            owner: Any = None) -> PrefillJob:
        return PrefillJob(self, slot, input_ids, mrope_positions, rope_delta, pixel_values, image_grid_thw,
                          block_hashes, owner)

    @torch.no_grad()
    def prefill(self, slot: int, input_ids: torch.Tensor, mrope_positions: torch.Tensor | None = None,
                rope_delta: int = 0, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Write one whole prompt's K/V into ``slot`` (allocated, with room for it), pass after pass,
        and return the logits after its last token."""
        job = self.job(slot, input_ids, mrope_positions, rope_delta, pixel_values, image_grid_thw)
        while not job.finished:
            self.run([job])
        return job.logits

    def plan_pass(self, jobs: list[PrefillJob], max_images: int | None = None) -> list[tuple[PrefillJob, int, int]]:
        """The next pass's pieces ``(job, start, end)``: the jobs in order, up to ``chunk`` tokens in
        all, and (``max_images``) no more jobs holding image features than that, so the features kept
        until a prompt's last piece stay within what the memory plan measured. The first job always
        gets a piece."""
        pieces, left, images = [], self.chunk, 0
        for job in jobs:
            if left <= 0:
                break
            if pieces and max_images is not None and job.holds_images and images + job.image_count() > max_images:
                break
            take = min(job.remaining, left)
            pieces.append((job, job.done, job.done + take))
            left -= take
            images += job.image_count() if job.holds_images else 0
        return pieces

    @torch.no_grad()
    def run(self, jobs: list[PrefillJob]) -> list[PrefillJob]:
        """One pass over the next pieces of ``jobs`` (:meth:`plan_pass`); the jobs of the pass."""
        return self.run_pass(self.plan_pass(jobs))

    @torch.no_grad()
    def run_pass(self, pieces: list[tuple[PrefillJob, int, int]]) -> list[PrefillJob]:
        """Compute the pieces. Returns their jobs; those it finished have ``logits`` and their slot
        holds the prompt (``cache.set_prefilled``)."""
        decoder, device = self.decoder, self.cache.device
        hidden = decoder.embed_tokens(torch.cat([job.ids[start:end] for job, start, end in pieces]))
        image_at, deepstack_rows, offset = [], [], 0
        for job, start, end in pieces:
            if job.images is None and job.holds_images and bool(job.is_image[start:end].any()):
                self._encode_images(job)
            if job.images is not None and bool(job.is_image[start:end].any()):
                # Index lists made on the host: boolean masks on the device would make it wait.
                at = job.is_image[start:end].nonzero()[:, 0] + offset
                first = int(job.before[start]) - job.skipped_tokens
                rows = slice(first, first + int(at.shape[0]))
                image_at.append(at)
                hidden.index_copy_(0, at.to(device, non_blocking=True), job.images[rows].to(hidden.dtype))
                deepstack_rows.append([layer[rows] for layer in job.deepstack])
            offset += end - start
        deepstack = None
        if image_at:
            at = torch.cat(image_at).to(device, non_blocking=True)
            deepstack = (at, [torch.cat(layer) for layer in zip(*deepstack_rows)])
        positions = torch.cat([job.mrope[:, start:end] for job, start, end in pieces], dim=1)
        normed = self._layers(hidden, positions, pieces, deepstack)
        ends, offset = [], 0
        for job, start, end in pieces:
            offset += end - start
            job.done = end
            if job.finished:
                ends.append(offset - 1)
        if ends:
            logits = decoder.lm_head(normed[torch.tensor(ends, device=device)]).float()
            for job, row in zip([job for job, _, _ in pieces if job.finished], logits):
                job.logits = row
                job.images, job.deepstack = None, []
                self.cache.set_prefilled(job.slot, job.length, job.rope_delta)
                self.cache.register_prefix(job.slot, job.block_hashes)  # prompts that start the same way share them
        return [job for job, _, _ in pieces]

    def _encode_images(self, job: PrefillJob) -> None:
        """The features of the job's images after those wholly in the cached prefix, one image at a time."""
        grid = job._grid
        per_image = (grid.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
        skip, skipped = 0, 0
        while skip < len(per_image) and skipped + per_image[skip] <= int(job.before[job.done]):
            skipped += per_image[skip]
            skip += 1
        pixels = job._pixels.to(self.cache.device, self.visual.patch_embed.proj.weight.dtype, non_blocking=True)
        job.images, job.deepstack = self.encode_images(pixels, grid, skip)
        job.skipped_tokens = skipped

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

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, pieces: list, deepstack) -> torch.Tensor:
        """The decoder over the pass's pieces (tokens ``start..end-1`` of each job's slot, packed in
        ``hidden``); returns the final-normed hidden states of every token."""
        decoder, cache = self.decoder, self.cache
        heads, kv_heads, dim = decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
        groups = heads // kv_heads
        device = hidden.device
        cos, sin = decoder.rotary_emb(hidden, positions[:, None, :])  # [1, T, D]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, D]: broadcast over heads
        signed_sin = torch.cat([-sin[..., :dim // 2], sin[..., dim // 2:]], dim=-1)
        written = torch.cat([job.physical[start:end] for job, start, end in pieces])
        attention, offset = [], 0  # per piece: its rows in the pass, the positions it attends to, its mask
        for job, start, end in pieces:
            mask = None
            if start > 0:  # causal for the piece's queries, over everything before it too
                mask = (torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None])
            attention.append((slice(offset, offset + end - start), job.physical[:end], mask))
            offset += end - start
        first = decoder.layers[0].input_layernorm
        normed = F.rms_norm(hidden, hidden.shape[-1:], first.weight, first.variance_epsilon)
        for index, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            qk, value = decoder._qk_v(index, layer, normed)
            qk = qk_norm_rotary(qk, decoder.qk_norm_weights[index], cos, signed_sin, attn.q_norm.variance_epsilon)
            keys, values = cache.keys[index], cache.values[index]
            keys.index_copy_(1, written, qk[:, heads:].transpose(0, 1).to(keys.dtype))
            values.index_copy_(1, written, value.transpose(0, 1).to(values.dtype))
            outs = []
            for rows, seen, mask in attention:
                # [1, H, C, D] queries over [1, H, end, D] keys (each KV head repeated for its query heads)
                query = qk[rows, :heads].transpose(0, 1)[None]
                past_k = keys[:, seen].repeat_interleave(groups, dim=0)[None]
                past_v = values[:, seen].repeat_interleave(groups, dim=0)[None]
                out = F.scaled_dot_product_attention(query, past_k, past_v, attn_mask=mask, is_causal=mask is None,
                                                     scale=decoder.scaling)
                outs.append(out[0].transpose(0, 1).reshape(-1, heads * dim))
            post = layer.post_attention_layernorm
            hidden, normed = add_rms_norm(hidden, attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs)),
                                          post.weight, post.variance_epsilon)
            following = decoder.layers[index + 1].input_layernorm if index + 1 < len(decoder.layers) else decoder.norm
            update = decoder._mlp(index, layer, normed, silu_mul)
            if deepstack is not None and index < len(deepstack[1]):
                at, features = deepstack
                hidden = (hidden + update).index_add_(0, at, features[index].to(hidden.dtype))
                normed = F.rms_norm(hidden, hidden.shape[-1:], following.weight, following.variance_epsilon)
            else:
                hidden, normed = add_rms_norm(hidden, update, following.weight, following.variance_epsilon)
        return normed
