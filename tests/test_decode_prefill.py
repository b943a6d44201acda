"""The engine's prefill (service/decode/qwen3_prefill.py) against transformers' forward, and what
lets prompts share it in the paged cache: the prefix cache and the forks of a request's n choices.
The tiny float32 Qwen3-VL of tests/test_decode_step.py, blocks of 8 tokens."""
from __future__ import annotations

import pytest
import torch

from bench.hf_prefill import prefill, prefill_position_ids
from service.decode import DecodeRunner, PagedKVCache
from service.decode.cache import prompt_block_hashes
from service.decode.qwen3_prefill import Qwen3VLPrefill
from tests.test_decode_step import (  # noqa: F401 - model: the fixture
    IMAGE, TOLERANCE, batch_inputs, hf_greedy, image_prompt, make_runner, model, text_prompt, tiny_config)


def assert_slot_matches(model, runner: DecodeRunner, slot: int, logits: torch.Tensor, reference, inputs: dict,
                        steps: int) -> None:
    """A prefilled slot holds transformers' K/V (``reference``: its prefill of ``inputs``) and decodes
    ``steps`` greedy tokens with its logits, from our prefill's ``logits``."""
    cache = runner.cache
    where = cache.positions(slot, cache.lengths[slot])
    for layer in range(cache.num_layers):
        ref = reference.past_key_values.layers[layer]
        assert (cache.keys[layer][:, where] - ref.keys[0]).abs().max() < TOLERANCE
        assert (cache.values[layer][:, where] - ref.values[0]).abs().max() < TOLERANCE
    tokens, ours = [int(logits.argmax())], [logits]
    for _ in range(steps - 1):
        ours.append(runner.decode([slot], [tokens[-1]])[0].clone())
        tokens.append(int(ours[-1].argmax()))
    ref_tokens, ref_logits = hf_greedy(model, steps, inputs)
    assert tokens == ref_tokens[0].tolist()
    assert (torch.stack(ours) - ref_logits[:, 0]).abs().max() < TOLERANCE


def two_image_prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    first, first_pixels = image_prompt(3, 2, (1, 4, 6), seed=seed)
    second, second_pixels = image_prompt(1, 4, (1, 6, 4), seed=seed + 10)
    return torch.cat([first, second]), torch.cat([first_pixels, second_pixels]), [(1, 4, 6), (1, 6, 4)]


@pytest.mark.parametrize("chunk", [5, 1024])
@pytest.mark.parametrize("kind", ["text", "two images"])
def test_our_prefill_writes_the_kv_and_logits_of_transformers(model, kind, chunk):
    """Image by image, chunk by chunk (5 tokens: chunks that cut through the images) straight into
    scattered blocks: the same K/V and logits as transformers' forward, then the same decoding."""

    if kind == "text":
        ids, pixels, grids = text_prompt(23, seed=80), None, None
        inputs = batch_inputs([ids])
    else:
        ids, pixels, grids = two_image_prompt(seed=81)
        inputs = batch_inputs([ids], [(pixels[:24], grids[0]), (pixels[24:], grids[1])])
    reference = prefill(model, **inputs)
    runner = make_runner(model, slots=3, max_len=64, num_blocks=24)
    cache = runner.cache
    hole = cache.allocate(8)
    cache.allocate(8)
    cache.free(hole)  # blocks 0 free, 1 taken: the prompt gets blocks 0, 2, 3, 4, 5
    grid = torch.tensor(grids) if grids else None
    positions, deltas = prefill_position_ids(model, ids[None], None, (ids == IMAGE).int()[None], grid)
    slot = cache.allocate(40)
    assert cache.block_table[slot][:5].tolist() == [0, 2, 3, 4, 5]
    logits = Qwen3VLPrefill(model, runner.decoder, chunk=chunk).prefill(
        slot, ids, positions[1:, 0], int(deltas[0]), pixels, grid)
    assert (logits - reference.logits[0]).abs().max() < TOLERANCE
    assert cache.lengths[slot] == len(ids) and cache.rope_deltas[slot] == int(deltas[0])
    assert_slot_matches(model, runner, slot, logits, reference, inputs, steps=8)


@pytest.mark.parametrize("chunk", [7, 64])
def test_prompts_packed_in_shared_passes_get_what_each_gets_alone(model, chunk):
    """Pieces of several prompts in one pass (7 tokens: every pass cuts a prompt, some hold two;
    64: all three in one): each slot ends with transformers' K/V and logits for its own prompt."""

    two_ids, two_pixels, two_grids = two_image_prompt(seed=70)
    one_ids, one_pixels = image_prompt(4, 3, (1, 4, 4), seed=72)
    prompts = [(text_prompt(11, seed=71), None, None), (two_ids, two_pixels, two_grids),
               (one_ids, one_pixels, [(1, 4, 4)])]
    runner = make_runner(model, slots=3, max_len=64, num_blocks=24)
    prefiller = Qwen3VLPrefill(model, runner.decoder, chunk=chunk)
    jobs, references = [], []
    for ids, pixels, grids in prompts:
        grid = torch.tensor(grids) if grids else None
        positions, deltas = prefill_position_ids(model, ids[None], None, (ids == IMAGE).int()[None], grid)
        slot = runner.cache.allocate(len(ids) + 8)
        jobs.append(prefiller.job(slot, ids, positions[1:, 0], int(deltas[0]), pixels, grid))
        images = list(zip(torch.split(pixels, [t * h * w for t, h, w in grids]), grids)) if grids else []
        inputs = batch_inputs([ids], images)
        references.append((inputs, prefill(model, **inputs)))
    passes = 0
    while any(not job.finished for job in jobs):
        prefiller.run([job for job in jobs if not job.finished])
        passes += 1
    total = sum(job.length for job in jobs)
    assert passes == -(-total // chunk)  # every pass but the last is full: pieces of the next prompt fill it
    for job, (inputs, reference) in zip(jobs, references):
        assert (job.logits - reference.logits[0]).abs().max() < TOLERANCE
        assert_slot_matches(model, runner, job.slot, job.logits, reference, inputs, steps=4)


def test_our_prefill_refuses_a_prompt_beyond_the_reservation(model):

    runner = make_runner(model, slots=1, max_len=64)
    slot = runner.cache.allocate(16)
    with pytest.raises(ValueError, match="does not fit"):
        Qwen3VLPrefill(model, runner.decoder).prefill(slot, text_prompt(17, seed=1))
    assert runner.cache.lengths[slot] == 0


def test_prefix_blocks_are_shared_counted_and_evicted_last_used_first():
    cache = PagedKVCache(tiny_config(), 4, 48, 6, dtype=torch.float32, device="cpu", block_size=8)
    h = [bytes([i]) * 16 for i in range(4)]
    a = cache.allocate(24, h[:2])  # 3 blocks, nothing cached yet
    assert cache.cached_tokens[a] == 0 and cache.free_blocks == 3
    cache.register_prefix(a, h[:3])
    b = cache.allocate(20, h[:2])  # the first two blocks shared, one fresh
    assert cache.cached_tokens[b] == 16 and cache.block_table[b][:2].tolist() == cache.block_table[a][:2].tolist()
    assert cache.free_blocks == 2
    assert cache.allocation_cost(24, h[:3]) == 0 and cache.allocation_cost(24, [h[0], b"x" * 16]) == 2
    cache.free(a)  # block 2 (a's third) is cached and unused; blocks 0, 1 still used by b
    assert cache.free_blocks == 3
    cache.free(b)
    assert cache.free_blocks == 6
    c = cache.allocate(24, h[:3])  # all three found again, none of them computed
    assert cache.cached_tokens[c] == 24 and cache.free_blocks == 3
    cache.free(c)
    d = cache.allocate(48)  # 6 fresh blocks: the 3 empty ones first, then the cached ones (evicted)
    assert d is not None and cache.free_blocks == 0
    cache.free(d)
    e = cache.allocate(24, h[:3])
    assert cache.cached_tokens[e] == 0  # gone from the cache


def test_different_images_behind_the_same_token_ids_get_different_hashes():

    ids, _ = image_prompt(10, 20, (1, 8, 8), seed=90)  # 16 image tokens from position 11
    same = prompt_block_hashes(ids, IMAGE, [b"a" * 16], block_size=8)
    assert same == prompt_block_hashes(ids, IMAGE, [b"a" * 16], block_size=8) and len(same) == len(ids) // 8
    other = prompt_block_hashes(ids, IMAGE, [b"b" * 16], block_size=8)
    assert other[0] == same[0]  # the block before the image: the same tokens
    assert all(x != y for x, y in zip(same[1:], other[1:]))  # from the image on: different
    assert prompt_block_hashes(ids, IMAGE, [], block_size=8) == []  # placeholder tokens without an image


@pytest.mark.parametrize("kind", ["text", "image", "cached image, then another"])
def test_a_prompt_that_starts_like_a_cached_one_decodes_like_transformers(model, kind):
    """The second prompt shares the first one's leading blocks (the same tokens, or the same image
    and text before it) and computes only the rest: logits, K/V and decoding as transformers'. An
    image whose tokens are all cached is not encoded again; one cut by the cache boundary is."""

    second_image = None
    if kind == "text":
        head, pixels, grids = text_prompt(21, seed=91), None, None
    elif kind == "image":  # the image's tokens straddle the cached block boundary
        head, pixels = image_prompt(2, 3, (1, 4, 6), seed=92)
        grids = [(1, 4, 6)]
    else:  # 16 tokens (2 blocks) with the first image inside them; the second image comes after
        head, pixels = image_prompt(1, 9, (1, 4, 4), seed=95)
        second_image, second_pixels = image_prompt(0, 1, (1, 4, 6), seed=96)
        pixels, grids = torch.cat([pixels, second_pixels]), [(1, 4, 4), (1, 4, 6)]
    runner = make_runner(model, slots=3, max_len=64, num_blocks=24)
    cache = runner.cache
    prefiller = Qwen3VLPrefill(model, runner.decoder, chunk=5)
    grid = torch.tensor(grids) if grids else None
    digests = [bytes([i]) * 16 for i in range(len(grids or []))]
    results = []
    for tail_seed in (93, 94):
        ids = torch.cat([head, text_prompt(6, seed=tail_seed)] + ([second_image] if second_image is not None else []))
        positions, deltas = prefill_position_ids(model, ids[None], None, (ids == IMAGE).int()[None], grid)
        hashes = prompt_block_hashes(ids, IMAGE, digests, block_size=8)
        slot = cache.allocate(len(ids) + 8, hashes[:(len(ids) - 1) // 8])
        logits = prefiller.prefill(slot, ids, positions[1:, 0], int(deltas[0]), pixels, grid)
        cache.register_prefix(slot, hashes)
        results.append((ids, slot, logits))
    (_, first, _), (ids, second, logits) = results
    assert cache.cached_tokens[first] == 0 and cache.cached_tokens[second] == len(head) // 8 * 8 > 0
    images = []
    if grids:  # the patches of each image, in order
        sizes = [t * h * w for t, h, w in grids]
        images = list(zip(torch.split(pixels, sizes), grids))
    inputs = batch_inputs([ids], images)
    reference = prefill(model, **inputs)
    assert (logits - reference.logits[0]).abs().max() < TOLERANCE
    assert_slot_matches(model, runner, second, logits, reference, inputs, steps=6)


def test_a_slot_forks_into_held_slots_sharing_its_full_prompt_blocks():
    """n choices: the forks are held from the start (no other request can take their room), share
    the prompt's full blocks, get a copy of its partly filled last block, and hand everything back."""
    cache = PagedKVCache(tiny_config(), 4, 64, 12, dtype=torch.float32, device="cpu", block_size=8)
    # 20-token prompt + 4 new: 3 blocks; each fork shares the 2 full prompt blocks and takes 1 fresh.
    parent = cache.allocate(24, forks=2, prompt_tokens=20)
    assert parent == 0 and cache.free_blocks == 9
    assert not cache.can_allocate(64) and not cache.can_allocate(8, forks=2)  # 2 blocks and 2 slots are held
    assert cache.fits_at_all(24, 2, 20) and not cache.fits_at_all(64, 3, 0)
    positions = cache.positions(parent, 20)
    for pool in cache.keys:
        pool[:, positions] = torch.arange(20, dtype=torch.float32)[None, :, None]
    cache.set_prefilled(parent, 20, rope_delta=3)
    children = cache.fork(parent)
    assert children == [1, 2] and cache.free_blocks == 7 and cache.free_slots == 1
    for child in children:
        assert cache.lengths[child] == 20 and cache.rope_deltas[child] == 3
        assert cache.block_table[child, :2].tolist() == cache.block_table[parent, :2].tolist()  # shared
        assert cache.block_table[child, 2] != cache.block_table[parent, 2]  # its own last block...
        assert torch.equal(cache.keys[0][:, cache.positions(child, 20)], cache.keys[0][:, positions])  # ...a copy
    for slot in (parent, *children):
        cache.free(slot)
    assert cache.free_blocks == cache.num_blocks and cache.free_slots == 4
    held = cache.allocate(24, forks=2, prompt_tokens=20)
    cache.free(held)  # freed before its prefill finished: the held room comes back too
    assert cache.can_allocate(64 - 8, forks=3, prompt_tokens=0) is False and cache.allocate(8, forks=3) == 0


@pytest.mark.parametrize("vision_tokens", [None, 4, 6, 10, 12])
@pytest.mark.parametrize("order", ["cached first", "cached last"])
@torch.no_grad()
def test_images_of_several_prompts_in_one_pass_skip_the_cached_ones_and_keep_their_order(model, vision_tokens,
                                                                                          order):
    """One pass starts two prompts: one whose first image lies in a cached prefix (not encoded again),
    one with two images. Their three encoded images go through the vision tower together, in
    forwards of up to ``vision_tokens`` (4: one image each; 6, 10: a prompt's images split across
    forwards; None and 12: all at once); each prompt gets transformers' logits and K/V."""
    runner = make_runner(model, slots=4, max_len=64, num_blocks=30)
    cache = runner.cache
    prefiller = Qwen3VLPrefill(model, runner.decoder, chunk=64, vision_tokens=vision_tokens)
    head, head_pixels = image_prompt(1, 9, (1, 4, 4), seed=95)  # 16 tokens: 2 blocks with the first image
    second_image, second_pixels = image_prompt(0, 1, (1, 4, 6), seed=96)
    cached_pixels, cached_grids = torch.cat([head_pixels, second_pixels]), [(1, 4, 4), (1, 4, 6)]
    digests = [bytes([i]) * 16 for i in range(2)]

    def job(ids, pixels, grids, image_digests=()):
        grid = torch.tensor(grids)
        positions, deltas = prefill_position_ids(model, ids[None], None, (ids == IMAGE).int()[None], grid)
        hashes = prompt_block_hashes(ids, IMAGE, list(image_digests), block_size=8) if image_digests else []
        slot = cache.allocate(len(ids) + 8, hashes[:(len(ids) - 1) // 8])
        return prefiller.job(slot, ids, positions[1:, 0], int(deltas[0]), pixels, grid, hashes)

    first = job(torch.cat([head, text_prompt(6, seed=93), second_image]), cached_pixels, cached_grids, digests)
    while not first.finished:  # its blocks are registered: the next prompt that starts so shares them
        prefiller.run([first])
    cached_ids = torch.cat([head, text_prompt(6, seed=94), second_image])
    cached = job(cached_ids, cached_pixels, cached_grids, digests)
    assert cache.cached_tokens[cached.slot] == 16
    two_ids, two_pixels, two_grids = two_image_prompt(seed=70)
    fresh = job(two_ids, two_pixels, two_grids)
    jobs = [cached, fresh] if order == "cached first" else [fresh, cached]
    prefiller.run(jobs)
    assert all(j.finished for j in jobs)  # one pass
    for j, ids, pixels, grids in ((cached, cached_ids, cached_pixels, cached_grids),
                                  (fresh, two_ids, two_pixels, two_grids)):
        inputs = batch_inputs([ids], list(zip(torch.split(pixels, [t * h * w for t, h, w in grids]), grids)))
        reference = prefill(model, **inputs)
        assert (j.logits - reference.logits[0]).abs().max() < TOLERANCE
        assert_slot_matches(model, runner, j.slot, j.logits, reference, inputs, steps=3)
