"""The FP8 block-scaled math on the CPU: quantization, dequantization, the kernels' blockwise sums
written out in torch, the e4m3 bit decoding the Triton kernel uses, Fp8Linear and its fusion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.decode.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    Fp8Unsupported,
    decoder_linear_names,
    dequantize_blockwise,
    dequantize_gemm,
    dequantize_linears,
    gemm_for,
    quantize_activations,
    quantize_blockwise,
    quantize_linears,
    w8a8_reference,
)
from service.decode.qwen3_step import fuse_linears


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (64, 64), (130, 129)])
def test_blockwise_quantization_keeps_each_block_within_e4m3_rounding(shape):
    torch.manual_seed(sum(shape))
    weight = torch.randn(shape) * torch.logspace(-3, 0, shape[1])  # columns of very different magnitudes
    q, scale = quantize_blockwise(weight)
    assert q.dtype == FP8_DTYPE and q.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    # scale = amax / 448 per block, so each block's largest element is stored as exactly +-448.
    block = weight[:BLOCK, :BLOCK]
    assert scale[0, 0].item() == pytest.approx(block.abs().max().item() / FP8_MAX, rel=1e-6)
    assert q[:BLOCK, :BLOCK].float().abs().max().item() == FP8_MAX
    restored = dequantize_blockwise(q, scale, torch.float32)
    expanded = scale.repeat_interleave(BLOCK, 0)[:shape[0]].repeat_interleave(BLOCK, 1)[:, :shape[1]]
    # e4m3: 3 mantissa bits (half an ulp is 1/16 of the value); below 2**-6 subnormal steps of 2**-9.
    bound = torch.maximum(weight.abs() / 16, expanded * 2.0**-10) * (1 + 1e-6)
    assert ((restored - weight).abs() <= bound).all()


def test_a_block_of_zeros_gets_scale_one_and_stays_zero():
    weight = torch.zeros(BLOCK, 2 * BLOCK)
    weight[:, BLOCK:] = torch.randn(BLOCK, BLOCK)
    q, scale = quantize_blockwise(weight)
    assert scale[0, 0].item() == 1.0 and not q[:, :BLOCK].float().any()
    assert torch.equal(dequantize_blockwise(q, scale, torch.float32)[:, :BLOCK], weight[:, :BLOCK])


def test_activations_are_quantized_per_token_and_128_columns():
    torch.manual_seed(1)
    x = torch.randn(3, 300) * torch.tensor([[1.0], [100.0], [0.01]])
    x[0, BLOCK:2 * BLOCK] = 0  # an all-zero group: a tiny scale, zeros back
    q, scale = quantize_activations(x)
    assert q.shape == x.shape and scale.shape == (3, 3)
    for row in range(3):
        for group in range(3):
            part = x[row, group * BLOCK:(group + 1) * BLOCK]
            assert scale[row, group].item() == pytest.approx(max(part.abs().max().item(), 1e-10) / FP8_MAX, rel=1e-6)
    restored = q.float() * scale.repeat_interleave(BLOCK, 1)[:, :300]
    assert not restored[0, BLOCK:2 * BLOCK].any()
    assert ((restored - x).abs() <= x.abs() / 16 + scale.repeat_interleave(BLOCK, 1)[:, :300] * 2.0**-9).all()


def test_the_e4m3_bit_decoding_of_the_triton_kernel_matches_torch_for_every_byte():
    """The weight-only kernel reads FP8 bytes as integers (Triton converts float8 only on sm_89+):
    sign to bit 15, exponent and mantissa to bits 7..13 of an fp16, which then reads value / 256."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's two NaN codes never occur in a checkpoint
    half_bits = (codes + (codes & 0x80)) << 7
    assert torch.equal(half_bits, ((codes & 0x80) << 8) | ((codes & 0x7F) << 7))  # the sign carries into bit 15
    decoded = half_bits.to(torch.int16).view(torch.float16).float() * 256
    assert torch.equal(decoded.bfloat16().float(), decoded)  # exact in bf16 too
    expected = codes.to(torch.uint8).view(FP8_DTYPE).float()
    assert torch.equal(decoded, expected)


def kernel_weight_only(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight-only kernel's loop in torch: per 128-column step of K, the activations' tile times
    the FP8 values, each output column scaled by its row's block scale, accumulated in float32."""
    rows, cols = x.shape
    acc = torch.zeros(rows, weight.shape[0])
    row_blocks = torch.arange(weight.shape[0]) // BLOCK
    for kb in range(-(-cols // BLOCK)):
        k = slice(kb * BLOCK, (kb + 1) * BLOCK)
        acc += (x[:, k].float() @ weight[:, k].to(x.dtype).float().T) * scale[row_blocks, kb][None, :]
    return acc.to(x.dtype)


def kernel_w8a8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The FP8 tensor-core kernel's loop in torch: per 128-column step, the FP8 product scaled by the
    activations' (per row) and the weight's (per block of rows) scale of that step."""
    q, q_scale = quantize_activations(x)
    acc = torch.zeros(x.shape[0], weight.shape[0])
    row_blocks = torch.arange(weight.shape[0]) // BLOCK
    for kb in range(-(-x.shape[1] // BLOCK)):
        k = slice(kb * BLOCK, (kb + 1) * BLOCK)
        acc += (q[:, k].float() @ weight[:, k].float().T) * q_scale[:, kb][:, None] * scale[row_blocks, kb][None, :]
    return acc.to(x.dtype)


@pytest.mark.parametrize("rows, cols, out", [(1, 256, 384), (5, 300, 200), (64, 640, 130)])
def test_the_kernels_blockwise_sums_are_the_dequantized_product(rows, cols, out):
    torch.manual_seed(rows + cols)
    x = torch.randn(rows, cols)
    weight, scale = quantize_blockwise(torch.randn(out, cols) * 0.05)
    reference = dequantize_gemm(x, weight, scale)
    assert relative_error(kernel_weight_only(x, weight, scale), reference) < 1e-5
    w8a8 = kernel_w8a8(x, weight, scale)
    assert relative_error(w8a8, w8a8_reference(x, weight, scale)) < 1e-5
    # FP8 activations (3 mantissa bits) cost a few percent against the dequantized product.
    assert 1e-4 < relative_error(w8a8, reference) < 6e-2
    bf16 = kernel_weight_only(x.bfloat16(), weight, scale)
    assert relative_error(bf16, reference) < 1e-2


def fp8_linear(out_features: int, in_features: int, seed: int) -> tuple[Fp8Linear, torch.Tensor]:
    torch.manual_seed(seed)
    dense = torch.randn(out_features, in_features) * 0.1
    weight, scale = quantize_blockwise(dense)
    return Fp8Linear.from_tensors(weight, scale, gemm_for(torch.device("cpu"))), dequantize_blockwise(
        weight, scale, torch.float32)


def test_fp8_linear_computes_the_dequantized_linear_for_any_leading_shape():
    module, dense = fp8_linear(200, 300, seed=2)
    assert module.weight.dtype == FP8_DTYPE and module.weight_scale_inv.shape == (2, 3)
    x = torch.randn(2, 7, 300)
    assert torch.allclose(module(x), F.linear(x, dense), atol=1e-5)
    assert sum(p.numel() * p.element_size() for p in module.parameters()) == 200 * 300 + 2 * 3 * 4


def test_fp8_projections_fuse_only_where_the_scale_blocks_line_up():
    gate, gate_dense = fp8_linear(256, 64, seed=3)
    up, up_dense = fp8_linear(256, 64, seed=4)
    fused = fuse_linears([gate, up])
    assert isinstance(fused, Fp8Linear) and fused.weight.shape == (512, 64) and fused.weight_scale_inv.shape == (4, 1)
    assert up.weight.data_ptr() == fused.weight[256:].data_ptr()  # views: no second copy
    assert up.weight_scale_inv.data_ptr() == fused.weight_scale_inv[2:].data_ptr()
    x = torch.randn(3, 64)
    assert torch.allclose(fused(x), torch.cat([F.linear(x, gate_dense), F.linear(x, up_dense)], -1), atol=1e-5)
    assert torch.allclose(gate(x), F.linear(x, gate_dense), atol=1e-5)  # the modules still compute alone
    again = fuse_linears([gate, up])
    assert again.weight.data_ptr() == fused.weight.data_ptr()  # a second decoder finds them fused
    # q/k/v of 64/32/32 rows: k would start inside q's scale block. Left as they are.
    q, k, v = (fp8_linear(n, 64, seed=5 + n)[0] for n in (64, 32, 32))
    pointers = [m.weight.data_ptr() for m in (q, k, v)]
    assert fuse_linears([q, k, v]) is None
    assert [m.weight.data_ptr() for m in (q, k, v)] == pointers
    assert fuse_linears([gate, nn.Linear(64, 8, bias=False)]) is None  # mixed kinds


def test_quantize_then_dequantize_a_model_in_place():
    model = nn.Sequential()
    model.add_module("language_model", nn.Module())
    model.language_model.add_module("layers", nn.ModuleList([nn.Linear(64, 256, bias=False)]))
    model.add_module("lm_head", nn.Linear(64, 10, bias=False))
    names = decoder_linear_names(model)
    assert names == ["language_model.layers.0"]
    dense = model.language_model.layers[0].weight.detach().clone()
    quantize_linears(model, names, gemm_for(torch.device("cpu")))
    assert isinstance(model.language_model.layers[0], Fp8Linear) and type(model.lm_head) is nn.Linear
    dequantize_linears(model, torch.float32)
    restored = model.language_model.layers[0]
    assert type(restored) is nn.Linear and (restored.weight - dense).abs().max() <= dense.abs().max() / 16


def test_devices_without_an_fp8_gemm_are_refused_with_the_reason():
    assert gemm_for(torch.device("cpu")) is dequantize_gemm
    with pytest.raises(Fp8Unsupported, match="CUDA GPUs and the CPU"):
        gemm_for(torch.device("meta"))
