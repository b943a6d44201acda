"""Triton GEMMs over FP8 weights with 128x128 block scales (``float8_e4m3fn [N, K]``, ``float32
[ceil(N/128), ceil(K/128)]``), for :mod:`service.decode.fp8`. ``x`` is ``[M, K]``, the result ``[M, N]``.

- :func:`weight_only_matmul`: bf16/fp16 activations times the weight dequantized in registers,
  one 128-column block of K per step: the FP8 values (exact in fp16 and bf16) go to the tensor
  cores, each row's block scale multiplies the float32 product. Runs on every GPU Triton supports
  (sm_75+). Decoding the bytes is the kernel's main cost at decode batch sizes (it is bound by
  instructions before bandwidth: measured 1300 GB/s of FP8 on an H200 with the integer decode
  below, half of cuBLAS's bf16 rate), so sm_89+ use the hardware's conversion
  (``cvt.rn.f16x2.e4m3x2``, Triton's float8e4nv) and older GPUs three integer operations into
  fp16's bit layout. ``dot_f16``: the product in fp16 (the activations' tile converted, scaled by
  1/16 so that no bf16 activation under ~1e6 overflows) instead of the weights' tile converted
  on to bf16; which is faster is measured (bench/fp8_kernels.py). For the few rows of a decode
  step the grid is split over K as well (partial sums in float32, then one small reduction
  kernel) so that enough blocks of work stream the weights to keep the memory bus busy.
- :func:`quantize_activations` + :func:`block_matmul` (sm_89+): activations quantized to FP8 per
  token and 128 columns, an FP8 x FP8 tensor-core product per 128-column block, scaled by the
  activations' and the weight's scale of that block, accumulated in float32.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

try:  # CUDA builds of torch ship Triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

GROUP = 128  # the scale block: one K step of every kernel
MAX_SPLIT_K = 8
X_SCALE = 1.0 / 16  # activations' scale when the product is fp16: |x| up to ~1e6, bf16's precision from 1e-3
DOT_F16 = False  # bf16 activations: the product in fp16 (True) or the weights' tile converted to bf16


def triton_available() -> bool:
    return triton is not None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class DeviceFacts(NamedTuple):
    sms: int
    small_smem: bool  # Turing: 64 KiB of shared memory a block (the others have 99 KiB or more)
    native_fp8: bool  # sm_89+: the hardware converts float8_e4m3fn


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> DeviceFacts:
    properties = torch.cuda.get_device_properties(index)
    capability = (properties.major, properties.minor)
    return DeviceFacts(properties.multi_processor_count, capability < (8, 0), capability >= (8, 9))


_NO_NATIVE_DECODE: set[int] = set()  # devices whose hardware decode failed its check at load


def native_decode(device: torch.device) -> bool:
    """Whether the kernels decode FP8 bytes with the hardware's conversion on ``device`` by default."""
    index = _index(device)
    return _device_facts(index).native_fp8 and index not in _NO_NATIVE_DECODE


def disable_native_decode(device: torch.device) -> None:
    """The integer decode on ``device`` from now on (its Triton or driver cannot run the other)."""
    _NO_NATIVE_DECODE.add(_index(device))


def _dequant_options(x: torch.Tensor, native: bool | None, dot_f16: bool | None) -> dict:
    """The kernels' constexprs for decoding the weight bytes and the product's dtype; ``UNSCALE``
    undoes the powers of two the decode and the activations' conversion leave in the product."""
    native = native_decode(x.device) if native is None else native
    dot_f16 = (DOT_F16 and x.dtype == torch.bfloat16) if dot_f16 is None else dot_f16
    unscale = (1.0 if native else 256.0) * (1.0 / X_SCALE if dot_f16 else 1.0)
    return {"x_scale": X_SCALE, "NATIVE_FP8": native, "DOT_F16": dot_f16, "UNSCALE": unscale}


def _rows_config(rows: int, small_smem: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the weight-only kernel for this many rows:
    decode steps (<= 32 rows) stream the weight in narrow tiles; prefill chunks use square tiles,
    smaller where shared memory is small (Turing: 64 KiB)."""
    if rows <= 16:
        return 16, 64, 4, 3
    if rows <= 32:
        return 32, 64, 4, 3
    return (32, 64, 4, 2) if small_smem else (64, 64, 4, 2)


def _split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Splits of K that bring the grid to about two blocks of work per SM (at least 2 K steps each)."""
    split, target = 1, 2 * _device_facts(_index(device)).sms
    while split < MAX_SPLIT_K and tiles * split < target and k_blocks >= 4 * split:
        split *= 2
    return split


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, native: bool | None = None,
                       dot_f16: bool | None = None) -> torch.Tensor:
    """``x @ dequantize(weight, scale).T`` in ``x``'s dtype (bf16 or fp16), the weight read once as FP8.
    ``native`` / ``dot_f16`` (default: this device's) choose how the weight is decoded (benchmarks)."""
    rows, cols = x.shape
    out_features = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    options = _dequant_options(x, native, dot_f16)
    block_m, block_n, warps, stages = _rows_config(rows, _device_facts(_index(x.device)).small_smem)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    split = _split_k(tiles, triton.cdiv(cols, GROUP), x.device) if rows <= 32 else 1
    out = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    target = out if split == 1 else torch.empty((split, rows, out_features), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, block_m), split)
    _weight_only_kernel[grid](
        x, weight.view(torch.uint8), scale, target, rows, out_features, cols,
        x.stride(0), weight.stride(0), scale.stride(0), target.stride(-2), target.stride(0) if split > 1 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP=GROUP, SPLIT_K=split, **options, num_warps=warps, num_stages=stages)
    if split > 1:
        total = rows * out_features
        _sum_splits_kernel[(triton.cdiv(total, 1024),)](target, out, total, SPLIT=split, BLOCK=1024, num_warps=4)
    return out


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, native: bool | None = None,
                  dot_f16: bool | None = None) -> torch.Tensor:
    """The decode step's shape (``x [M <= 16, K]``): each program streams a tile of output features
    over the whole K, no split of K (so no partial sums and no second kernel), ``GROUPS`` scale
    blocks of K a step (more bytes in flight for few tiles), the tile shape autotuned per (N, K)
    on the device. ``weight_only_matmul``'s math; TritonGemm times it beside the weight-only kernel
    (and each one's fp16 product) and keeps the fastest for each shape on this device."""
    rows, cols = x.shape
    out_features = weight.shape[0]
    if rows > 16:
        raise ValueError(f"skinny_matmul takes at most 16 rows, got {rows}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    args = (x, weight.view(torch.uint8), scale, out, rows, out_features, cols, x.stride(0), weight.stride(0),
            scale.stride(0), out.stride(0))
    options = _dequant_options(x, native, dot_f16)
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter: no device to autotune on
        _skinny_kernel_jit[(triton.cdiv(out_features, 32),)](*args, GROUP=GROUP, **options, BLOCK_N=32, GROUPS=2)
    else:
        _skinny_kernel[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)](*args, GROUP=GROUP, **options)
    return out


def quantize_activations(x: torch.Tensor, column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``[M, K]`` and float32 scales ``[M, ceil(K/128)]`` per token and 128 columns.
    ``column_major_scales``: scales with strides (1, M), the layout ``torch._scaled_mm`` takes."""
    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    blocks = triton.cdiv(cols, GROUP)
    q = torch.empty((rows, cols), device=x.device, dtype=torch.float8_e4m3fn)
    scales = (torch.empty((blocks, rows), device=x.device, dtype=torch.float32).t() if column_major_scales
              else torch.empty((rows, blocks), device=x.device, dtype=torch.float32))
    _quantize_kernel[(rows, blocks)](x, q, scales, cols, x.stride(0), q.stride(0), scales.stride(0), scales.stride(1),
                                     GROUP=GROUP, num_warps=1)
    return q, scales


def block_matmul(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 activations (``q``, scales per token x 128 columns) times the FP8 weight on tensor cores."""
    rows, cols = q.shape
    out_features = weight.shape[0]
    block_m = 32 if rows <= 32 else 64
    block_n = 64 if rows <= 64 else 128
    out = torch.empty((rows, out_features), device=q.device, dtype=out_dtype)
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, block_m))
    _block_fp8_kernel[grid](
        q, q_scale, weight, scale, out, rows, out_features, cols,
        q.stride(0), q_scale.stride(0), q_scale.stride(1), weight.stride(0), scale.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP=GROUP, num_warps=4, num_stages=3)
    return out


if triton is not None:

    @triton.jit
    def _e4m3_as_f16_over_256(bits):
        """float8_e4m3fn bytes (uint8) -> fp16 holding value / 2**8, exactly: the sign to bit 15,
        exponent and mantissa (7 bits) to bits 7..13, so that fp16's exponent bias (15) reads e4m3's
        (7) less 8, for normal and subnormal values alike (e4m3's NaN, never stored, would read 480).
        ``(b + (b & 0x80)) << 7``: the sign, shifted to bit 14 twice, carries into bit 15."""
        b = bits.to(tl.int32)
        return ((b + (b & 0x80)) << 7).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _weights_f16(bits, NATIVE_FP8: tl.constexpr):
        """float8_e4m3fn bytes -> fp16: the value itself (sm_89+'s conversion), or value / 256 (integer decode)."""
        if NATIVE_FP8:
            return bits.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            return _e4m3_as_f16_over_256(bits)

    @triton.jit
    def _dequant_dot(x, bits, NATIVE_FP8: tl.constexpr, DOT_F16: tl.constexpr, x_scale):
        """x [BM, 128] times the decoded weight tile [BN, 128] transposed, float32 [BM, BN], in the
        powers of two the caller's ``UNSCALE`` undoes. (``x_scale`` is a run-time argument: as a
        constant, compiled on an H200, bf16 activations past fp16's range came out infinite, as if
        the scaling were folded after the conversion to fp16.)"""
        w = _weights_f16(bits, NATIVE_FP8)
        if DOT_F16:
            return tl.dot((x.to(tl.float32) * x_scale).to(tl.float16), tl.trans(w))
        else:
            return tl.dot(x, tl.trans(w.to(x.dtype)))

    @triton.jit
    def _tile(X, W, S, M, N, stride_xm, stride_wn, stride_sn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP: tl.constexpr):
        """This program's output tile (grid: N tiles, M tiles, ...): row and column offsets, their
        bounds, and pointers to the activations' and the weight's first K block and the weight's
        block scales (one per row: its 128-row block's, in K block 0)."""
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, GROUP)
        x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        return offs_m, offs_n, offs_k, offs_m < M, offs_n < N, x_ptrs, w_ptrs, S + (offs_n // GROUP) * stride_sn

    @triton.jit
    def _k_block(x_ptrs, w_ptrs, s_ptrs, kb, blocks, K, offs_k, m_ok, n_ok, GROUP: tl.constexpr, x_scale,
                 NATIVE_FP8: tl.constexpr, DOT_F16: tl.constexpr, UNSCALE: tl.constexpr):
        """K block ``kb``'s share of the tile, float32: the FP8 values themselves (exact in fp16 and
        bf16) on the tensor cores, each weight row's block scale (one per row in this K block) on the
        float32 product. Past the last block the loaded tiles are zeros (any in-range scale will do)."""
        k_ok = kb * GROUP + offs_k < K
        x = tl.load(x_ptrs + kb * GROUP, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + kb * GROUP, mask=n_ok[:, None] & k_ok[None, :], other=0)
        s = tl.load(s_ptrs + tl.minimum(kb, blocks - 1), mask=n_ok, other=0.0)
        return _dequant_dot(x, w, NATIVE_FP8, DOT_F16, x_scale) * (s * UNSCALE)[None, :]

    @triton.jit
    def _weight_only_kernel(X, W, S, OUT, M, N, K, stride_xm, stride_wn, stride_sn, stride_om, stride_os,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
                            x_scale, NATIVE_FP8: tl.constexpr, DOT_F16: tl.constexpr,
                            UNSCALE: tl.constexpr):
        pid_k = tl.program_id(2)
        offs_m, offs_n, offs_k, m_ok, n_ok, x_ptrs, w_ptrs, s_ptrs = _tile(
            X, W, S, M, N, stride_xm, stride_wn, stride_sn, BLOCK_M, BLOCK_N, GROUP)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        blocks = tl.cdiv(K, GROUP)
        for step in range(0, tl.cdiv(blocks, SPLIT_K)):  # K blocks pid_k, pid_k + SPLIT_K, ...
            acc += _k_block(x_ptrs, w_ptrs, s_ptrs, step * SPLIT_K + pid_k, blocks, K, offs_k, m_ok, n_ok, GROUP,
                            x_scale, NATIVE_FP8, DOT_F16, UNSCALE)
        out_ptrs = OUT + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _sum_splits_kernel(PARTIAL, OUT, TOTAL, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < TOTAL
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in tl.static_range(SPLIT):
            acc += tl.load(PARTIAL + split * TOTAL + offs, mask=ok, other=0.0)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _quantize_kernel(X, Q, QS, K, stride_xm, stride_qm, stride_sm, stride_sk, GROUP: tl.constexpr):
        row = tl.program_id(0)
        kb = tl.program_id(1)
        offs = kb * GROUP + tl.arange(0, GROUP)
        ok = offs < K
        x = tl.load(X + row.to(tl.int64) * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-10) / 448.0
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(Q + row.to(tl.int64) * stride_qm + offs, q.to(Q.dtype.element_ty), mask=ok)
        tl.store(QS + row * stride_sm + kb * stride_sk, scale)

    @triton.jit
    def _block_fp8_kernel(A, AS, W, S, OUT, M, N, K, stride_am, stride_asm, stride_ask, stride_wn, stride_sn,
                          stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
        offs_m, offs_n, offs_k, m_ok, n_ok, a_ptrs, w_ptrs, s_ptrs = _tile(
            A, W, S, M, N, stride_am, stride_wn, stride_sn, BLOCK_M, BLOCK_N, GROUP)
        as_ptrs = AS + offs_m * stride_asm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, GROUP)):
            k_ok = kb * GROUP + offs_k < K
            a = tl.load(a_ptrs + kb * GROUP, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + kb * GROUP, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            a_scale = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
            w_scale = tl.load(s_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, tl.trans(w)) * a_scale[:, None] * w_scale[None, :]
        out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _skinny_kernel_jit(X, W, S, OUT, M, N, K, stride_xm, stride_wn, stride_sn, stride_om, GROUP: tl.constexpr,
                           x_scale, NATIVE_FP8: tl.constexpr, DOT_F16: tl.constexpr,
                           UNSCALE: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        offs_m, offs_n, offs_k, m_ok, n_ok, x_ptrs, w_ptrs, s_ptrs = _tile(
            X, W, S, M, N, stride_xm, stride_wn, stride_sn, 16, BLOCK_N, GROUP)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        blocks = tl.cdiv(K, GROUP)
        for step in range(0, tl.cdiv(blocks, GROUPS)):
            for g in tl.static_range(GROUPS):  # independent loads: GROUPS blocks of K in flight a step
                acc += _k_block(x_ptrs, w_ptrs, s_ptrs, step * GROUPS + g, blocks, K, offs_k, m_ok, n_ok, GROUP,
                                x_scale, NATIVE_FP8, DOT_F16, UNSCALE)
        out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _brief_bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    # Narrow tiles with several K blocks a step for the few tiles of a small N, wide ones for a large N.
    _SKINNY_CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g}, num_warps=w, num_stages=st)
                       for n, g, w, st in ((16, 2, 4, 4), (16, 4, 4, 3), (32, 1, 4, 4), (32, 2, 4, 3), (32, 4, 4, 2),
                                           (64, 1, 4, 3), (64, 2, 8, 3), (128, 1, 8, 2))]
    _SKINNY_KEY = ["N", "K", "NATIVE_FP8", "DOT_F16"]
    try:
        _skinny_kernel = triton.autotune(configs=_SKINNY_CONFIGS, key=_SKINNY_KEY, do_bench=_brief_bench,
                                         cache_results=True)(_skinny_kernel_jit)
    except TypeError:  # an older Triton: its own (longer) timing, nothing cached
        _skinny_kernel = triton.autotune(configs=_SKINNY_CONFIGS, key=_SKINNY_KEY)(_skinny_kernel_jit)
