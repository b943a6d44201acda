"""The fast decode path (service.decode) against transformers' own Qwen3-VL decoding.

A tiny random Qwen3-VL in float32: from transformers' own prefill copied into the paged cache
(bench/hf_prefill.py), our explicit decode step must give the logits of ``model.generate``
(greedy, DynamicCache) to 1e-4 at every step, and the same tokens,
for text and image prompts, batches of different lengths, slots that are freed and reused, and
sequences whose blocks lie scattered in the pool. Blocks are 8 tokens here (64 in the service), so
every sequence spans several. The engine's own prefill: tests/test_decode_prefill.py.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from bench.hf_prefill import load_prefill, prefill
from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder, context_buckets

IMAGE, VIDEO, VISION_START, VISION_END = 250, 251, 248, 249
PATCH_DIM = 3 * 2 * 16 * 16  # channels * temporal_patch * patch * patch
TOLERANCE = 1e-4


def tiny_config() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=0.2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                 mrope_interleaved=True)),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
            spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=256, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model() -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(tiny_config()).eval()


def text_prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 240, (length,), generator=torch.Generator().manual_seed(seed))


def image_prompt(before: int, after: int, grid: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with one image (t*h*w/4 placeholder tokens) and its pixel patches."""
    t, h, w = grid
    ids = torch.cat([text_prompt(before, seed), torch.tensor([VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]),
                     text_prompt(after, seed + 1)])
    pixels = torch.randn(t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    return ids, pixels


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def batch_inputs(rows: list[torch.Tensor], images: list[tuple[torch.Tensor, tuple]] = ()) -> dict:
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE).int()}
    if images:
        inputs["pixel_values"] = torch.cat([p for p, _ in images])
        inputs["image_grid_thw"] = torch.tensor([g for _, g in images])
    return inputs


def hf_greedy(model, steps: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own decoding: tokens [B, steps] and float32 logits [steps, B, vocab]."""
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits).float()


def make_runner(model, slots: int = 4, max_len: int = 64, num_blocks: int | None = None,
                **decoder_options) -> DecodeRunner:
    cache = PagedKVCache(model.config, slots, max_len, num_blocks, dtype=torch.float32, device="cpu", block_size=8)
    return DecodeRunner(Qwen3VLDecoder(model, cache, **decoder_options), context_step=8)


def our_greedy(model, runner: DecodeRunner, steps: int, inputs: dict, device_tokens: bool = False,
               reserve: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Our prefill + paged cache + decode steps: tokens [B, steps], logits [steps, B, vocab], the slots.
    ``device_tokens``: feed each step the previous step's argmax as a tensor (no host round trip).
    ``reserve``: tokens each slot reserves (default: the whole context)."""
    cache = runner.cache
    pf = prefill(model, **inputs)
    slots = [cache.allocate(reserve) for _ in pf.lengths]
    for row, slot in enumerate(slots):
        load_prefill(cache, slot, pf.past_key_values, pf.lengths[row], row=row, rope_delta=pf.rope_deltas[row])
    logits = [pf.logits]
    tokens = [pf.logits.argmax(-1)]
    for _ in range(steps - 1):
        logits.append(runner.decode(slots, tokens[-1] if device_tokens else tokens[-1].tolist()).clone())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits), slots


def assert_same_decoding(ours: tuple, reference: tuple) -> None:
    tokens, logits = ours[:2]
    ref_tokens, ref_logits = reference
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max().item() < TOLERANCE
    assert torch.equal(tokens, ref_tokens)


def test_single_text_sequence_matches_transformers(model):
    inputs = batch_inputs([text_prompt(11, seed=1)])
    assert_same_decoding(our_greedy(model, make_runner(model), 20, inputs), hf_greedy(model, 20, inputs))


def test_image_prompt_matches_transformers_with_a_nonzero_rope_delta(model):
    ids, pixels = image_prompt(5, 7, (1, 4, 6), seed=2)
    inputs = batch_inputs([ids], [(pixels, (1, 4, 6))])
    runner = make_runner(model)
    ours = our_greedy(model, runner, 16, inputs)
    assert runner.cache.rope_deltas[ours[2][0]] == 3 - 6  # 6 image tokens span max(h, w)/2 = 3 positions
    assert_same_decoding(ours, hf_greedy(model, 16, inputs))


def test_left_padded_text_batch_matches_transformers(model):
    inputs = batch_inputs([text_prompt(n, seed=n) for n in (3, 17, 9)])
    assert_same_decoding(our_greedy(model, make_runner(model), 14, inputs), hf_greedy(model, 14, inputs))


def test_left_padded_batch_with_images_matches_transformers(model):
    first, first_pixels = image_prompt(2, 3, (1, 4, 4), seed=5)
    third, third_pixels = image_prompt(6, 1, (1, 6, 4), seed=6)
    inputs = batch_inputs([first, text_prompt(4, seed=7), third],
                          [(first_pixels, (1, 4, 4)), (third_pixels, (1, 6, 4))])
    runner = make_runner(model)
    ours = our_greedy(model, runner, 12, inputs)
    assert [runner.cache.rope_deltas[s] for s in ours[2]] == [2 - 4, 0, 3 - 6]
    assert_same_decoding(ours, hf_greedy(model, 12, inputs))


def test_fused_projections_decode_the_same_and_leave_the_model_intact(model):
    fused_model = Qwen3VLForConditionalGeneration(tiny_config()).eval()
    fused_model.load_state_dict(model.state_dict())
    runner = make_runner(fused_model, fuse_projections=True)
    assert runner.decoder.fused
    attn = fused_model.model.language_model.layers[1].self_attn
    qkv = runner.decoder.qkv_proj[1].weight
    assert attn.k_proj.weight.data_ptr() == qkv[64:96].data_ptr()  # a view: no second copy of the weights
    for name, weight in fused_model.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name]), name
    again = Qwen3VLDecoder(fused_model, PagedKVCache(fused_model.config, 1, 8, dtype=torch.float32, device="cpu"),
                           fuse_projections=True)
    assert again.qkv_proj[1].weight.data_ptr() == qkv.data_ptr() and torch.equal(again.qkv_proj[1].weight, qkv)
    ids, pixels = image_prompt(3, 4, (1, 4, 4), seed=8)
    inputs = batch_inputs([ids, text_prompt(9, seed=9)], [(pixels, (1, 4, 4))])
    ours = our_greedy(fused_model, runner, 12, inputs)
    assert_same_decoding(ours, hf_greedy(fused_model, 12, inputs))  # transformers' forward on the fused model
    assert_same_decoding(ours, hf_greedy(model, 12, inputs))


def test_compiled_elementwise_kernels_trace_whole_and_decode_the_same(model):
    """torch.compile traces each fused chain without graph breaks (fullgraph); aot_eager keeps this fast."""
    inputs = batch_inputs([text_prompt(n, seed=40 + n) for n in (4, 9, 6)])
    runner = make_runner(model, compile_backend="aot_eager")
    assert_same_decoding(our_greedy(model, runner, 10, inputs), hf_greedy(model, 10, inputs))


def test_tokens_fed_back_as_a_device_tensor_in_any_slot_order(model):
    runner = make_runner(model, slots=4)
    runner.cache.allocate()  # slot 0 stays busy without a sequence: the batch lands in slots 1..3
    inputs = batch_inputs([text_prompt(n, seed=50 + n) for n in (7, 3, 12)])
    ours = our_greedy(model, runner, 10, inputs, device_tokens=True)
    assert ours[2] == [1, 2, 3]
    assert_same_decoding(ours, hf_greedy(model, 10, inputs))


def test_freed_slots_are_reused_while_others_keep_decoding(model):
    """A long sequence leaves; a short one takes its slot (stale K/V beyond it must not leak in)."""
    runner = make_runner(model, slots=2)
    cache = runner.cache
    long_in, kept_in, new_in = (batch_inputs([text_prompt(n, seed=10 + n)]) for n in (30, 6, 4))
    ref_kept_tokens, ref_kept_logits = hf_greedy(model, 12, kept_in)
    ref_new_tokens, ref_new_logits = hf_greedy(model, 6, new_in)

    def load(inputs) -> tuple[int, int]:
        pf = prefill(model, **inputs)
        slot = cache.allocate()
        load_prefill(cache, slot, pf.past_key_values, pf.lengths[0], rope_delta=pf.rope_deltas[0])
        return slot, int(pf.logits.argmax())

    long_slot, long_token = load(long_in)
    kept_slot, kept_token = load(kept_in)
    assert (long_slot, kept_slot) == (0, 1)
    kept_tokens = [kept_token]
    for step in range(6):
        logits = runner.decode([long_slot, kept_slot], [long_token, kept_tokens[-1]])
        assert (logits[1] - ref_kept_logits[step + 1, 0]).abs().max() < TOLERANCE
        long_token, _ = logits.argmax(-1).tolist()
        kept_tokens.append(int(logits[1].argmax()))
    cache.free(long_slot)
    assert cache.free_slots == 1
    new_slot, new_token = load(new_in)
    assert new_slot == long_slot and cache.lengths[new_slot] == 4
    new_tokens = [new_token]
    for step in range(5):  # order differs from slot order on purpose
        logits = runner.decode([kept_slot, new_slot], [kept_tokens[-1], new_tokens[-1]])
        assert (logits[0] - ref_kept_logits[step + 7, 0]).abs().max() < TOLERANCE
        assert (logits[1] - ref_new_logits[step + 1, 0]).abs().max() < TOLERANCE
        kept_tokens.append(int(logits[0].argmax()))
        new_tokens.append(int(logits[1].argmax()))
    assert kept_tokens == ref_kept_tokens[0].tolist()
    assert new_tokens == ref_new_tokens[0].tolist()


def test_a_lone_sequence_in_a_high_slot_decodes_over_inactive_rows(model):
    runner = make_runner(model, slots=4)
    cache = runner.cache
    for _ in range(3):
        cache.allocate()
    cache.free(0)
    cache.free(1)  # slots 0 and 1 free (rows of the step, inactive), the sequence in slot 2
    inputs = batch_inputs([text_prompt(13, seed=20)])
    ours = our_greedy(model, runner, 10, inputs)
    assert ours[2] == [0]  # the lowest free slot is taken first
    cache.free(0)
    slot = cache.allocate()
    assert slot == 0
    cache.allocate()  # slot 1 taken but never prefilled: it must not take part
    pf = prefill(model, **inputs)
    high = cache.allocate()
    assert high == 3
    load_prefill(cache, high, pf.past_key_values, pf.lengths[0])
    tokens, logits = [int(pf.logits.argmax())], [pf.logits[0]]
    for _ in range(9):
        logits.append(runner.decode([high], [tokens[-1]])[0].clone())
        tokens.append(int(logits[-1].argmax()))
    assert cache.lengths_dev.tolist() == cache.lengths == [0, 0, 0, 13 + 9]  # inactive rows kept theirs
    ref_tokens, ref_logits = hf_greedy(model, 10, inputs)
    assert tokens == ref_tokens[0].tolist()
    assert (torch.stack(logits) - ref_logits[:, 0]).abs().max() < TOLERANCE


def test_decoding_up_to_the_reservation_then_refusing(model):
    runner = make_runner(model, slots=1, max_len=64)
    cache = runner.cache
    inputs = batch_inputs([text_prompt(20, seed=30)])
    pf = prefill(model, **inputs)
    slot = cache.allocate(22)  # 3 blocks of 8: room for 24 tokens
    assert cache.capacity[slot] == 24 and cache.free_blocks == 8 - 3
    load_prefill(cache, slot, pf.past_key_values, pf.lengths[0])
    token = int(pf.logits.argmax())
    for _ in range(4):  # lengths 20..23 decode; the slot is then full (24 tokens)
        token = int(runner.decode([slot], [token]).argmax())
    assert cache.lengths[slot] == 24
    with pytest.raises(ValueError, match="full"):
        runner.decode([slot], [token])
    with pytest.raises(ValueError, match="does not fit"):
        load_prefill(cache, slot, pf.past_key_values, 25)


def test_bad_slots_are_refused_and_change_nothing(model):
    runner = make_runner(model, slots=2)
    cache = runner.cache
    with pytest.raises(ValueError, match="no sequence"):
        runner.decode([0], [1])  # free slot
    slot = cache.allocate()
    with pytest.raises(ValueError, match="no sequence"):
        runner.decode([slot], [1])  # allocated, never prefilled
    with pytest.raises(ValueError, match="not allocated"):
        load_prefill(cache, 1, None, 3)
    cache.free(slot)
    with pytest.raises(ValueError, match="already free"):
        cache.free(slot)
    assert cache.lengths == [0, 0] and cache.lengths_dev.tolist() == [0, 0] and cache.free_slots == 2
    assert cache.free_blocks == cache.num_blocks


def test_blocks_are_reserved_per_request_and_handed_back():
    config = tiny_config()
    cache = PagedKVCache(config, 3, 64, 10, dtype=torch.float32, device="cpu", block_size=8)
    assert cache.max_blocks == 8 and cache.keys[0].shape == (2, (10 + 1) * 8, 16)  # + the scratch block
    a = cache.allocate(17)  # 3 blocks
    b = cache.allocate(40)  # 5 blocks
    assert (a, b) == (0, 1) and cache.free_blocks == 2
    assert not cache.can_allocate(17) and cache.allocate(17) is None  # a slot is free, blocks are not
    assert cache.allocate(16) == 2 and cache.allocate(1) is None  # now no slot either
    assert cache.block_table[a].tolist() == [0, 1, 2] + [10] * 5  # unused entries: the scratch block
    cache.free(a)
    c = cache.allocate(64)
    assert c is None  # 8 blocks wanted, 3 free
    cache.free(b)
    c = cache.allocate(64)
    assert c == 0 and sorted(cache.block_table[c].tolist()) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert cache.positions(c, 10).tolist() == [*range(8), 8, 9]
    with pytest.raises(ValueError, match="does not fit"):
        cache.positions(2, 17)  # slot 2 reserved 16 tokens


def test_sequences_in_scattered_blocks_decode_like_transformers(model):
    """Slots that were taken and freed in turn leave the free blocks out of order: each sequence's
    blocks then lie apart in the pool, and decoding must still read exactly its own tokens."""
    runner = make_runner(model, slots=6, max_len=64, num_blocks=20)
    cache = runner.cache
    taken = [cache.allocate(tokens) for tokens in (8, 16, 8, 16)]  # blocks 0 | 1 2 | 3 | 4 5
    cache.free(taken[0])
    cache.free(taken[2])  # free blocks: 0, 3, 6..19
    inputs = batch_inputs([text_prompt(n, seed=60 + n) for n in (13, 5, 21)])
    ours = our_greedy(model, runner, 12, inputs, reserve=34)
    tables = [cache.block_table[s].tolist() for s in ours[2]]
    assert tables[0][:5] == [0, 3, 6, 7, 8]
    assert_same_decoding(ours, hf_greedy(model, 12, inputs))


def test_kv_cache_is_sized_from_a_byte_budget():
    config = Qwen3VLConfig(text_config=dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                                            num_key_value_heads=8, head_dim=128, intermediate_size=6144))
    per_token = PagedKVCache.bytes_per_token(config, torch.bfloat16)
    assert per_token == 2 * 28 * 8 * 128 * 2  # K and V, 28 layers, 8 KV heads of 128, bf16
    with pytest.raises(ValueError, match="hold no sequence"):
        PagedKVCache(config, 4, 4096, 63, dtype=torch.bfloat16, device="meta")
    cache = PagedKVCache(config, 8, 1023, 100, dtype=torch.bfloat16, device="meta")
    assert cache.num_slots == 8 and cache.max_blocks == 16 and cache.keys[0].shape == (8, 101 * 64, 128)
    assert cache.nbytes == 101 * 64 * per_token


def test_context_buckets_cover_every_length_with_little_waste():
    assert context_buckets(4096) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3840, 4096]
    assert context_buckets(100) == [100]
    assert context_buckets(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    buckets = context_buckets(40000)
    assert buckets[-1] == 40000 and all(b % 256 == 0 for b in buckets[:-1])
    assert all(b <= max(a + 256, a * 1.25) for a, b in zip(buckets, buckets[1:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("options", [{}, {"fuse_projections": True, "compile_backend": "inductor"}])
def test_cuda_graphs_decode_like_transformers_on_the_gpu(model, options):
    gpu_model = Qwen3VLForConditionalGeneration(tiny_config()).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.cuda()
    inputs = {k: v.cuda() for k, v in batch_inputs([text_prompt(n, seed=n) for n in (5, 12)]).items()}
    cache = PagedKVCache(gpu_model.config, 4, 256, dtype=torch.float32, device="cuda")  # blocks of 64
    runner = DecodeRunner(Qwen3VLDecoder(gpu_model, cache, **options), context_step=8)
    for slot in our_greedy(gpu_model, runner, 3, inputs)[2]:  # compiles outside the capture
        cache.free(slot)
    runner.capture()
    assert runner.uses_cuda_graphs, runner.capture_error
    ours = our_greedy(gpu_model, runner, 12, inputs, device_tokens=True)
    reference = hf_greedy(gpu_model, 12, inputs)
    assert torch.equal(ours[0], reference[0])
    assert (ours[1] - reference[1]).abs().max().item() < 1e-3  # TF32 / kernel choices differ on the GPU
