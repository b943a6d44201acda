"""The vision tower over several images at once (service/decode/vision.py) against transformers'
own ``Qwen3VLVisionModel.forward``: images of different and equal sizes in one forward, and the
batches ``batch_tokens`` cuts. The tiny float32 Qwen3-VL of tests/test_decode_step.py."""
from __future__ import annotations

import pytest
import torch

from service.decode.qwen3_prefill import split_images
from service.decode.vision import VisionEncoder, _equal_runs
from tests.test_decode_step import TOLERANCE, image_prompt, model  # noqa: F401 - model: the fixture

GRIDS = [(1, 4, 6), (1, 6, 4), (1, 4, 4), (1, 4, 6), (1, 8, 4)]  # 24, 24, 16, 24, 32 patches


def images() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(image_prompt(0, 0, grid, seed=40 + i)[1], torch.tensor([grid])) for i, grid in enumerate(GRIDS)]


def transformers_features(model, pixels: torch.Tensor, grid: torch.Tensor):
    out = model.model.visual(pixels, grid_thw=grid)
    return out.pooler_output, out.deepstack_features


def assert_close(ours, reference) -> None:
    (embeds, deepstack), (ref_embeds, ref_deepstack) = ours, reference
    assert embeds.shape == ref_embeds.shape and (embeds - ref_embeds).abs().max() < TOLERANCE
    assert len(deepstack) == len(ref_deepstack) > 0
    for layer, ref in zip(deepstack, ref_deepstack):
        assert layer.shape == ref.shape and (layer - ref).abs().max() < TOLERANCE


@torch.no_grad()
def test_images_of_several_sizes_in_one_forward_get_what_transformers_gives_each(model):
    given = images()
    features = VisionEncoder(model.model.visual).encode(given)
    assert len(features) == len(given)
    for ours, (pixels, grid) in zip(features, given):
        assert_close(ours, transformers_features(model, pixels, grid))
    # and what transformers' forward gives them all at once (its own split of attention per image)
    pixels, grid = torch.cat([p for p, _ in given]), torch.cat([g for _, g in given])
    ref_embeds, ref_deepstack = transformers_features(model, pixels, grid)
    assert_close((torch.cat([e for e, _ in features]), [torch.cat(layer) for layer in zip(*(d for _, d in features))]),
                 (ref_embeds, ref_deepstack))


@torch.no_grad()
def test_batch_tokens_bounds_each_forward_and_an_image_larger_than_it_goes_alone(model, monkeypatch):
    encoder = VisionEncoder(model.model.visual, batch_tokens=12)  # tokens: 6, 6, 4, 6, 8
    batches = []
    forward = encoder._forward
    monkeypatch.setattr(encoder, "_forward", lambda batch: batches.append([int(g.prod()) // 4 for _, g in batch])
                        or forward(batch))
    given = images()
    features = encoder.encode(given)
    assert batches == [[6, 6], [4, 6], [8]]  # in order, each batch as many as fit
    for ours, (pixels, grid) in zip(features, given):
        assert_close(ours, transformers_features(model, pixels, grid))
    batches.clear()
    small = VisionEncoder(model.model.visual, batch_tokens=3)
    monkeypatch.setattr(small, "_forward", lambda batch: batches.append(len(batch)) or forward(batch))
    small.encode(given[:2])
    assert batches == [1, 1]  # each image larger than the bound: alone, not refused


def test_equal_runs_group_consecutive_images_of_one_patch_count():
    assert _equal_runs([24, 24, 16, 24, 24, 24]) == [(0, 2, 24), (48, 1, 16), (64, 3, 24)]
    assert _equal_runs([16]) == [(0, 1, 16)]


def test_split_images_cuts_a_prompts_patches_per_image():
    pixels = torch.arange(40 * 2, dtype=torch.float32).view(40, 2)
    grid = torch.tensor([(1, 4, 6), (1, 4, 4)])
    parts = split_images(pixels, grid)
    assert [p.shape[0] for p, _ in parts] == [24, 16]
    assert torch.equal(parts[1][0], pixels[24:]) and parts[1][1].tolist() == [[1, 4, 4]]


def test_a_vision_batch_is_whole_images_of_the_largest_request_that_a_pass_holds():
    from service.sizing import vision_batch_tokens

    assert vision_batch_tokens(1024, 981, 4) == 981  # one image
    assert vision_batch_tokens(2048, 981, 4) == 2 * 981
    assert vision_batch_tokens(4096, 981, 4) == 4 * 981
    assert vision_batch_tokens(8192, 981, 4) == 4 * 981  # never more than the measured request holds
    assert vision_batch_tokens(512, 981, 4) == 981  # a pass shorter than an image: one image at a time
    assert vision_batch_tokens(4096, 981, 1) == 981


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned staging and the compiled blocks are CUDA's")
@torch.no_grad()
def test_on_cuda_the_staged_copies_and_the_compiled_blocks_give_transformers_features(model):
    """Three forwards through one pinned buffer (each batch's copy waits for the previous one to have
    left it) with the blocks compiled for any patch count: transformers' features for every image."""
    import copy

    gpu = copy.deepcopy(model).cuda()
    encoder = VisionEncoder(gpu.model.visual, batch_tokens=12, compile_backend="inductor")
    given = images()
    features = encoder.encode(given)
    assert encoder._staging is not None and encoder._staging.is_pinned()
    for ours, (pixels, grid) in zip(features, given):
        reference = transformers_features(gpu, pixels.cuda(), grid.cuda())
        assert_close(ours, reference)


@pytest.mark.parametrize("first", [(1, 4, 6), (1, 4, 8), (1, 4, 4)])  # 24 patches; the hidden size (32); the head dim (16)
@torch.no_grad()
def test_the_compiled_blocks_are_two_graphs_for_any_image_size_count_and_mix(model, first):
    """Compiled (here with dynamo's aot_eager, which needs no compiler), every block and every batch
    (one image, several of one size, of mixed sizes, in any order) reuses the same two graphs, whatever
    size the first image has: a request never waits for a compilation after the first, and the
    features are transformers'."""
    from torch._dynamo.utils import counters

    assert model.config.vision_config.hidden_size == 32 and model.config.vision_config.num_heads == 2
    torch._dynamo.reset()
    counters.clear()
    encoder = VisionEncoder(model.model.visual, compile_backend="aot_eager")
    given = images()
    opening = (image_prompt(0, 0, first, seed=39)[1], torch.tensor([first]))
    for batch in ([opening], [given[0]], [given[2]], given[:2], [given[2]] * 3, given, [given[4]]):
        for ours, (pixels, grid) in zip(encoder.encode(batch), batch):
            assert_close(ours, transformers_features(model, pixels, grid))
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
