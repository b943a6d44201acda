"""The Triton FP8 GEMMs (service/decode/fp8_kernels.py) against the dequantized product.

On a GPU: every kernel at M = 1..1024 on the real Qwen3-VL-2B/4B projection shapes (fused q/k/v,
o, fused gate/up, down), the path gemm_for picks and its check, CUDA graph capture, and an FP8
checkpoint's resident bytes. Without a GPU (conftest sets TRITON_INTERPRET=1: the kernels' code
executed on the CPU by Triton's interpreter), the kernel tests run on small shapes in fp16 (the
interpreter's bf16 dot is wrong; compiled Triton's is not).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from service.decode import fp8_kernels
from service.decode.fp8 import (
    FP8_DTYPE,
    dequantize_blockwise,
    quantize_activations,
    quantize_blockwise,
    w8a8_reference,
)
from service.decode.fp8_kernels import triton_available

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not (triton_available() and (ON_GPU or INTERPRETED)),
                                   reason="the Triton kernels need a CUDA GPU (or Triton's interpreter)")
needs_gpu = pytest.mark.skipif(not (ON_GPU and triton_available()), reason="needs a CUDA GPU with Triton")


def fp8_tensor_cores() -> bool:
    return INTERPRETED or (ON_GPU and torch.cuda.get_device_capability() >= (8, 9))


# (out, in) of one layer's projections as the engine runs them: q/k/v and gate/up fused.
REAL_SHAPES = {
    "2b": [(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144)],
    "4b": [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)],
}
ROWS = (1, 2, 4, 8, 16, 32, 64, 1024)
if INTERPRETED:  # small enough for numpy: partial blocks in N and K, and K long enough to split
    REAL_SHAPES = {"small": [(200, 320), (96, 2048)]}
    ROWS = (1, 5, 24, 40)
DTYPES = (torch.float16,) if INTERPRETED else (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def interpreter_device_facts(monkeypatch):
    """Under the interpreter there is no GPU to ask for its SM count and shared memory."""
    if INTERPRETED:
        monkeypatch.setattr(fp8_kernels, "_device_facts", lambda index: fp8_kernels.DeviceFacts(8, False, True))
        monkeypatch.setattr(fp8_kernels, "_index", lambda device: 0)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


def problem(rows: int, out_features: int, in_features: int, dtype, seed: int):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, in_features, device=DEVICE, generator=generator).to(dtype)
    dense = torch.randn(out_features, in_features, device=DEVICE, generator=generator) * 0.02
    weight, scale = quantize_blockwise(dense)
    return x, weight, scale


def dequantized_product(x, weight, scale):
    return F.linear(x.float(), dequantize_blockwise(weight, scale, torch.float32))


# How the weight bytes are decoded (native: sm_89+'s conversion, else integer operations) and
# whether the product is fp16: every combination a device can take.
DECODES = [(native, dot_f16) for native in (False, True) for dot_f16 in (False, True)
           if not native or fp8_tensor_cores()]
DECODE_IDS = [f"{'native' if n else 'integer'}-{'f16dot' if d else 'xdot'}" for n, d in DECODES]


@needs_kernels
@pytest.mark.parametrize("native, dot_f16", DECODES, ids=DECODE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("model", list(REAL_SHAPES))
def test_the_weight_only_kernel_is_the_dequantized_product(model, rows, dtype, native, dot_f16):
    for index, (out_features, in_features) in enumerate(REAL_SHAPES[model]):
        x, weight, scale = problem(rows, out_features, in_features, dtype, seed=rows * 10 + index)
        y = fp8_kernels.weight_only_matmul(x, weight, scale, native=native, dot_f16=dot_f16)
        assert y.shape == (rows, out_features) and y.dtype == dtype
        assert relative_error(y, dequantized_product(x, weight, scale)) < 1e-2, (out_features, in_features)


@needs_kernels
@pytest.mark.parametrize("native, dot_f16", DECODES, ids=DECODE_IDS)
def test_activations_past_fp16s_range_survive_the_fp16_product(native, dot_f16):
    """A bf16 activation of 1e5 (past fp16's 65504: an outlier channel) stays finite and exact
    to the kernels' precision when the product is taken in fp16."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter: bf16 dots are wrong there
    x, weight, scale = problem(3, 96, 384, dtype, seed=7)
    x[:, 5] = 1e5
    for kernel in (fp8_kernels.weight_only_matmul, fp8_kernels.skinny_matmul):
        y = kernel(x, weight, scale, native=native, dot_f16=dot_f16)
        assert torch.isfinite(y.float()).all()
        assert relative_error(y, dequantized_product(x, weight, scale)) < 1e-2


@needs_kernels
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("model", list(REAL_SHAPES))
def test_the_fp8_tensor_core_kernel_is_the_block_scaled_product(model, rows):
    if not fp8_tensor_cores():
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    dtype = DTYPES[0]
    for index, (out_features, in_features) in enumerate(REAL_SHAPES[model]):
        x, weight, scale = problem(rows, out_features, in_features, dtype, seed=rows * 10 + index)
        # (The interpreter's float32 -> float8 cast mis-rounds values that round up into the next
        # binade, 124 -> 64: there the GEMM gets torch's quantized activations.)
        quantize = quantize_activations if INTERPRETED else fp8_kernels.quantize_activations
        q, q_scale = quantize(x)
        y = fp8_kernels.block_matmul(q, q_scale, weight, scale, dtype)
        assert y.shape == (rows, out_features) and y.dtype == dtype
        assert relative_error(y, w8a8_reference(x, weight, scale)) < 1e-2
        # FP8 activations cost a few percent against the dequantized product.
        assert relative_error(y, dequantized_product(x, weight, scale)) < 6e-2


@needs_gpu  # the interpreter's float32 -> float8 cast is wrong across binades (see above)
@pytest.mark.parametrize("column_major", [False, True])
def test_the_activation_quantization_kernel_is_torchs(column_major):
    x, _, _ = problem(37, 8, 700, DTYPES[0], seed=3)
    x[2, 128:256] = 0
    q, scale = fp8_kernels.quantize_activations(x, column_major_scales=column_major)
    expected_q, expected_scale = quantize_activations(x)
    assert q.dtype == FP8_DTYPE and scale.shape == expected_scale.shape
    assert scale.stride() == ((1, 37) if column_major else (6, 1))
    assert torch.allclose(scale, expected_scale, rtol=1e-6, atol=0)
    # The same rounding but for the odd tie (x / scale computed in another order): one e4m3 step.
    assert (q.float() != expected_q.float()).float().mean().item() < 0.01
    assert ((q.float() - expected_q.float()).abs() <= expected_q.float().abs() / 8 + 2.0**-9).all()


@needs_gpu
def test_the_gpu_gets_its_fp8_path_checked_and_named():
    from service.decode.fp8 import TritonGemm, describe, gemm_for

    gemm = gemm_for(torch.device("cuda"))
    major, minor = torch.cuda.get_device_capability()
    assert isinstance(gemm, TritonGemm) and f"sm_{major}{minor}" in describe(gemm)
    assert gemm.fp8_tensor_cores == ((major, minor) >= (8, 9))
    for rows in (1, 32, 33, 300):  # both sides of the weight-only threshold
        x, weight, scale = problem(rows, 1024, 2048, torch.bfloat16, seed=rows)
        assert relative_error(gemm(x, weight, scale), dequantized_product(x, weight, scale)) < 6e-2


@needs_gpu
def test_the_decode_shapes_take_the_fastest_variant_and_it_is_the_product():
    """The start-up's measured choice on a 4B projection: a choice for every decode shape timed,
    and whichever kernel it routes to computes the dequantized product."""
    from service.decode.fp8 import gemm_for

    gemm = gemm_for(torch.device("cuda"))
    x, weight, scale = problem(1, 2560, 9728, torch.bfloat16, seed=11)
    gemm.measure([(weight, scale)], [1, 8, 32], torch.bfloat16)
    bf16 = torch.bfloat16
    assert set(gemm.decode.timings) == {(1, 2560, 9728, bf16), (8, 2560, 9728, bf16), (32, 2560, 9728, bf16)}
    assert all(v in gemm.variants for v in gemm.decode.chosen.values())
    for rows in (1, 8, 32):
        for dtype in (torch.bfloat16, torch.float16):  # fp16 activations: no choice timed, the baseline
            x, _, _ = problem(rows, 2560, 9728, dtype, seed=rows)
            assert relative_error(gemm(x, weight, scale), dequantized_product(x, weight, scale)) < 1e-2


@needs_kernels
def test_a_triton_that_cannot_build_the_hardware_decode_gets_the_integer_one(monkeypatch):
    """sm_89+ decode FP8 bytes with the hardware's conversion; where a GPU's Triton cannot build
    it (faked here: the kernel raises as a failed compile does), the load check falls back to the
    integer decode instead of refusing the checkpoint, and refuses only when that fails too."""
    if ON_GPU:
        pytest.skip("the GPU's own path: test_the_gpu_gets_its_fp8_path_checked_and_named")
    from service.decode.fp8 import Fp8Unsupported, TritonGemm

    real = fp8_kernels.weight_only_matmul
    broken = {"integer too": False}

    def weight_only(x, w, s, **options):
        native = options.get("native")
        if (fp8_kernels.native_decode(x.device) if native is None else native) or broken["integer too"]:
            raise RuntimeError("PassManager::run failed")
        return real(x, w, s, **options)

    monkeypatch.setattr(fp8_kernels, "weight_only_matmul", weight_only)
    monkeypatch.setattr(fp8_kernels, "_NO_NATIVE_DECODE", set())
    device = torch.device("cpu")
    assert fp8_kernels.native_decode(device)
    gemm = TritonGemm(device, fp8_tensor_cores=False, scaled_mm=False)
    gemm.check()
    assert not fp8_kernels.native_decode(device)
    x, weight, scale = problem(3, 96, 384, torch.float16, seed=1)
    assert relative_error(gemm(x, weight, scale), dequantized_product(x, weight, scale)) < 1e-2
    broken["integer too"] = True
    with pytest.raises(Fp8Unsupported, match="use the bf16 checkpoint"):
        TritonGemm(device, fp8_tensor_cores=False, scaled_mm=False).check()


@needs_gpu
def test_scaled_mm_block_scaling_on_hopper():
    from service.decode.fp8 import TritonGemm

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuBLASLt's 1x128 x 128x128 block scaling is Hopper-only")
    gemm = TritonGemm(torch.device("cuda"), fp8_tensor_cores=True, scaled_mm=True)
    gemm.check()
    if not gemm.scaled_mm:  # the service then takes the Triton kernel (logged at load)
        pytest.skip(f"torch {torch.__version__}'s _scaled_mm does not take 1x128 x 128x128 block scales here")
    x, weight, scale = problem(300, 2048, 6144, torch.bfloat16, seed=9)
    assert relative_error(gemm.w8a8(x, weight, scale), w8a8_reference(x, weight, scale)) < 1e-2


@needs_gpu
def test_the_fp8_gemms_replay_from_a_cuda_graph():
    from service.decode.fp8 import gemm_for

    gemm = gemm_for(torch.device("cuda"))
    for rows in (1, 8, 32, 64):
        x, weight, scale = problem(rows, 2048, 6144, torch.bfloat16, seed=rows)
        eager = gemm(x, weight, scale)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            gemm(x, weight, scale)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gemm(x, weight, scale)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, gemm(x, weight, scale)) and not torch.equal(out, eager)


@needs_gpu
def test_an_fp8_checkpoint_on_the_gpu_holds_one_byte_per_fp8_weight(tmp_path):
    """Resident memory after loading = FP8 weights at 1 byte + the rest at 2 (no bf16 copy)."""
    from service.decode.fp8 import Fp8Linear
    from service.engine.loading import load_model
    from service.tiny_model import build_config, build_model, build_tokenizer, write_fp8_checkpoint, write_processor

    tokenizer = build_tokenizer(qwen_ids=False)
    config = build_config("tiny", tokenizer)
    config.text_config.hidden_size, config.text_config.intermediate_size = 1024, 4096  # the linears dominate
    config.vision_config.out_hidden_size = 1024
    write_fp8_checkpoint(build_model(config), tmp_path)
    write_processor(tmp_path, tokenizer)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model, fp8 = load_model(tmp_path, torch.device("cuda"), torch.bfloat16)
    resident = torch.cuda.memory_allocated() - before
    fp8_bytes = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, Fp8Linear)
                    for p in m.parameters())
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fp8 and fp8_bytes > 0.5 * expected
    assert expected <= resident < expected * 1.05 + 8 * 2**20



@needs_kernels
@pytest.mark.parametrize("native, dot_f16", DECODES, ids=DECODE_IDS)
@pytest.mark.parametrize("rows, out, cols", [(1, 256, 384), (5, 200, 300), (16, 384, 256), (2, 64, 640)])
def test_the_skinny_decode_kernel_is_the_weight_only_math(rows, out, cols, native, dot_f16):
    """The decode step's no-split kernel (under Triton's interpreter here, in fp16): the dequantized
    product, whole and partial blocks in N and K, K's blocks not a multiple of a step's."""
    pytest.importorskip("triton")
    from service.decode.fp8_kernels import skinny_matmul

    x, weight, scale = problem(rows, out, cols, torch.float16, seed=rows + out)
    y = skinny_matmul(x, weight, scale, native=native, dot_f16=dot_f16)
    assert relative_error(y, dequantized_product(x, weight, scale)) < 2e-3
