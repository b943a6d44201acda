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
- a prompt's images go through the vision tower when its first piece that holds image tokens
  comes, together with the images of the other prompts doing so in the same pass (VisionEncoder:
  one forward for several images, up to ``vision_tokens``); no block waits for the device;
- DeepStack adds the image features of the vision tower's early layers to the first decoder layers'
  hidden states at the image tokens, as ``Qwen3VLTextModel`` does.

It computes what ``Qwen3VLForConditionalGeneration.forward`` computes (tests compare logits and K/V
with transformers, for one prompt and for pieces of several packed in one pass).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from service.decode.vision import VisionEncoder
from service.decode.qwen3_step import Qwen3VLDecoder, add_rms_norm, qk_norm_rotary, silu_mul
from service.sizing import DEFAULT_BATCHED_TOKENS, PROMPT_LOGPROBS_ROWS


def split_images(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The processor's patches of several images (``pixel_values``, in order; ``grid_thw`` ``[images,
    3]`` on the host) as ``(pixels, grid [1, 3])`` per image, for VisionEncoder.encode."""
    pixels = pixel_values.split(grid_thw.prod(-1).tolist())
    return [(p, grid_thw[i:i + 1]) for i, p in enumerate(pixels)]


class PrefillJob:
    """One prompt on its way into an allocated slot: what is computed so far, its images once encoded.

    ``input_ids`` ``[T]``, ``mrope_positions`` ``[3, T]`` (None: text positions 0..T-1) and
    ``image_grid_thw`` are host tensors; ``pixel_values`` (the processor's patches of every image,
    in order) may be on either side. The slot's first ``cache.cached_tokens[slot]`` tokens came
    from the prefix cache: they are not computed again, nor are the images whose tokens all lie
    among them. ``block_hashes``: the prompt's full blocks' prefix hashes, registered in the cache
    once they are written. ``owner``: whatever the caller keeps with the job (the scheduler's sequence).
    ``prompt_logprobs`` (vLLM's): gather each position's next prompt token's logprob and rank and the
    top that many there (every position is computed: nothing may come from the prefix cache); once
    finished, ``prompt_logprob_tensors`` holds them (logprobs, ranks ``[T-1]``, top logprobs and ids
    ``[T-1, k]``, on the device)."""

    def __init__(self, prefill: "Qwen3VLPrefill", slot: int, input_ids: torch.Tensor,
                 mrope_positions: torch.Tensor | None = None, rope_delta: int = 0,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 block_hashes: list[bytes] = (), owner: Any = None, prompt_logprobs: int | None = None):
        cache = prefill.cache
        device = cache.device
        self.slot, self.owner, self.rope_delta, self.block_hashes = slot, owner, rope_delta, list(block_hashes)
        self.length = int(input_ids.shape[0])
        self.physical = cache.positions(slot, self.length).to(device, non_blocking=True)  # checks the reservation
        self.done = cache.cached_tokens[slot]
        if not 0 <= self.done < self.length:
            raise ValueError(f"{self.done} cached tokens leave nothing to compute of a {self.length}-token prompt")
        if prompt_logprobs is not None and self.done:
            raise ValueError("prompt logprobs need every position computed: allocate without the prefix cache")
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
        self.prompt_logprobs = prompt_logprobs
        self._prompt_logprob_parts: list[tuple[torch.Tensor, ...]] = []  # per group of positions computed

    @property
    def prompt_logprob_tensors(self) -> tuple[torch.Tensor, ...]:
        parts = self._prompt_logprob_parts
        if not parts:  # a one-token prompt has none
            device, k = self.ids.device, self.prompt_logprobs
            return (torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device),
                    torch.zeros(0, k, device=device), torch.zeros(0, k, dtype=torch.long, device=device))
        return tuple(torch.cat(column) for column in zip(*parts))

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

    def __init__(self, model: Any, decoder: Qwen3VLDecoder, chunk: int = DEFAULT_BATCHED_TOKENS,
                 vision_tokens: int | None = None, compile_backend: str | None = None):
        """chunk: prompt tokens one pass computes at most; vision_tokens: image tokens one forward of
        the vision tower holds at most (None: all of a pass's images at once); compile_backend: the
        vision tower's (VisionEncoder)."""
        if chunk < 1:
            raise ValueError("the prefill chunk needs at least one token")
        self.model = model
        self.decoder = decoder
        self.cache = decoder.cache
        self.chunk = chunk
        self.vision = VisionEncoder(model.model.visual, vision_tokens, compile_backend)
        self.image_token_id = model.config.image_token_id

    def job(self, slot: int, input_ids: torch.Tensor, mrope_positions: torch.Tensor | None = None,
            rope_delta: int = 0, pixel_values: torch.Tensor | None = None,
            image_grid_thw: torch.Tensor | None = None, block_hashes: list[bytes] = (),
            owner: Any = None, prompt_logprobs: int | None = None) -> PrefillJob:
        return PrefillJob(self, slot, input_ids, mrope_positions, rope_delta, pixel_values, image_grid_thw,
                          block_hashes, owner, prompt_logprobs)

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
        # The images of the prompts whose image tokens start in this pass: through the tower together.
        starting = [job for job, start, end in pieces
                    if job.images is None and job.holds_images and bool(job.is_image[start:end].any())]
        if starting:
            self._encode_images(starting)
        image_at, deepstack_rows, offset = [], [], 0
        for job, start, end in pieces:
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
            if job.prompt_logprobs is not None:
                self._gather_prompt_logprobs(job, normed[offset:offset + end - start], start)
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

    def _gather_prompt_logprobs(self, job: PrefillJob, normed: torch.Tensor, start: int) -> None:
        """vLLM's prompt logprobs of a piece from position ``start`` (``normed``: its final-normed
        hidden states): position p's logits give token p + 1's logprob (the last position's give the
        first sampled token instead). The lm_head runs over PROMPT_LOGPROBS_ROWS positions at a time,
        so their logits and log-softmax stay a few tens of MiB; only each position's token logprob,
        rank (vLLM's: how many logprobs are >= it) and top k are kept."""
        stop = min(start + normed.shape[0], job.length - 1)
        for first in range(start, stop, PROMPT_LOGPROBS_ROWS):
            last = min(first + PROMPT_LOGPROBS_ROWS, stop)
            logits = self.decoder.lm_head(normed[first - start:last - start])
            logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # vLLM's compute_logprobs
            chosen = logprobs.gather(1, job.ids[first + 1:last + 1, None])
            top = torch.topk(logprobs, job.prompt_logprobs, dim=-1)
            job._prompt_logprob_parts.append((chosen[:, 0], (logprobs >= chosen).sum(-1), top.values, top.indices))

    def _encode_images(self, jobs: list[PrefillJob]) -> None:
        """The features of these jobs' images after those wholly in their cached prefix, through the
        vision tower together (VisionEncoder's batches)."""
        images, counts = [], []
        for job in jobs:
            grid = job._grid
            per_image = self.vision.tokens(grid)
            skip, skipped = 0, 0
            while skip < len(per_image) and skipped + per_image[skip] <= int(job.before[job.done]):
                skipped += per_image[skip]
                skip += 1
            images += split_images(job._pixels, grid)[skip:]
            counts.append(len(per_image) - skip)
            job.skipped_tokens = skipped
        features = iter(self.vision.encode(images))
        for job, count in zip(jobs, counts):
            own = [next(features) for _ in range(count)]
            job.images = torch.cat([embeds for embeds, _ in own]) if count > 1 else own[0][0]
            job.deepstack = [torch.cat(layer) for layer in zip(*(deep for _, deep in own))] if count > 1 else own[0][1]

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
        # Per piece: its rows in the pass, and where it has a prefix, the positions it attends to and its mask.
        attention, offset = [], 0
        for job, start, end in pieces:
            seen = mask = None
            if start > 0:  # causal for the piece's queries, over everything before it too
                seen = job.physical[:end]
                mask = (torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None])
            attention.append((slice(offset, offset + end - start), seen, mask))
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
                query = qk[rows, :heads].transpose(0, 1)[None]  # [1, H, C, D]
                if seen is None:
                    # A whole prompt so far: its own keys, causal, in flash attention, which reads each KV
                    # head once for its query heads (GQA): no gather from the blocks, no repeated copies.
                    out = F.scaled_dot_product_attention(query, qk[rows, heads:].transpose(0, 1)[None],
                                                         value[rows].transpose(0, 1)[None], is_causal=True,
                                                         scale=decoder.scaling, enable_gqa=True)
                else:
                    # After a prefix: [1, H, end, D] keys from the blocks, each KV head repeated for its query
                    # heads (flash takes no mask, and the kernels that do take no GQA).
                    past_k = keys[:, seen].repeat_interleave(groups, dim=0)[None]
                    past_v = values[:, seen].repeat_interleave(groups, dim=0)[None]
                    out = F.scaled_dot_product_attention(query, past_k, past_v, attn_mask=mask, scale=decoder.scaling)
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
