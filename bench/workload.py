"""The benchmark's model and request: a random-weight Qwen3-VL of a real size, one image + text.

The default request is the one the issue measured: one 1280x704 image (80x44 patches of 16 px,
merged 2x2 into 880 image tokens) and 40 text tokens, answered with 128 new tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from service.model_shapes import shape


@dataclass(frozen=True)
class Workload:
    image_width: int = 1280
    image_height: int = 704
    text_tokens: int = 40  # all text tokens of the prompt, vision start/end markers included
    new_tokens: int = 128

    def grid(self, patch: int) -> tuple[int, int, int]:
        """(t, h, w) patches of the image, as the processor reports them in image_grid_thw."""
        return 1, self.image_height // patch, self.image_width // patch

    def image_tokens(self, patch: int, merge: int) -> int:
        t, h, w = self.grid(patch)
        return t * h * w // (merge * merge)


def model_size(name: str) -> tuple[str, bool]:
    """``"4b-fp8"`` -> (``"4b"``, True): the architecture, and whether its decoder linears are FP8
    (Qwen's -FP8 layout: 128x128 block scales)."""
    name = name.strip().lower()
    return (name[:-len("-fp8")], True) if name.endswith("-fp8") else (name, False)


def build_model(size: str, device: str, dtype: torch.dtype) -> tuple[Qwen3VLForConditionalGeneration, float]:
    """A randomly initialised Qwen3-VL of ``size`` (2b, 4b, 8b, tiny; ``-fp8``: its decoder linears
    quantized blockwise to FP8 on ``device``) built on ``device``; and seconds."""
    start = time.perf_counter()
    architecture, fp8 = model_size(size)
    config = Qwen3VLConfig(**shape(architecture))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype directly (no fp32 copy on the GPU)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if fp8:
        from service.decode.fp8 import decoder_linear_names, gemm_for, quantize_linears

        quantize_linears(model, decoder_linear_names(model), gemm_for(torch.device(device)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, time.perf_counter() - start


def build_inputs(model, workload: Workload, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-shaped inputs for ``batch`` copies of the request (different random text and pixels)."""
    config, vision = model.config, model.config.vision_config
    device, dtype = model.device, model.dtype
    generator = torch.Generator().manual_seed(seed)
    n_image = workload.image_tokens(vision.patch_size, vision.spatial_merge_size)
    n_text = workload.text_tokens - 2  # minus <|vision_start|> and <|vision_end|>
    first = n_text // 2
    rows = []
    for _ in range(batch):
        text = torch.randint(0, 150000, (n_text,), generator=generator)  # below Qwen's special tokens
        rows.append(torch.cat([text[:first], torch.tensor([config.vision_start_token_id]),
                               torch.full((n_image,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                               text[first:]]))
    input_ids = torch.stack(rows).to(device)
    t, h, w = workload.grid(vision.patch_size)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(batch * t * h * w, patch_dim, generator=generator).to(device, dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).int(),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[t, h, w]] * batch, device=device),
    }
