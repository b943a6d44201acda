"""Skinny matrix products for the decode step: ``x [M, K] @ W[N, K]^T`` with M a handful of rows.

A decode step reads every weight once for a few rows of activations, so its projections are bound
by memory bandwidth, and cuBLAS's kernels for these shapes leave much of it unused (measured on an
H100: 33-73% of copy bandwidth for Qwen3-VL-2B's projections at M=1). Here each program streams a
tile of output features over the whole K (loads coalesced along K, the activations' tile reused
from cache), multiplying on the tensor cores with M padded to 16 rows; Triton's autotuner picks the
tile shape per (N, K) on the GPU it runs on. ``silu_mul`` fuses the MLP's activation into the down
projection's loads (its input is gate_up's output, ``[M, 2K]``).

Which is faster for a given shape is measured, not assumed: :class:`LinearChoice` times both on
the device at start-up (service/decode/kernel_choice.py, before the CUDA graphs are captured) and
keeps the faster one per (M, N, K), so a card where cuBLAS wins keeps cuBLAS.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from service.decode.kernel_choice import KernelChoice

try:  # CUDA builds of torch ship Triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

MAX_ROWS = 16  # one tensor-core tile of rows: larger M goes to cuBLAS


def gemv_available() -> bool:
    return triton is not None


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, *, silu_mul: bool = False) -> torch.Tensor:
    """``x @ weight.T`` for ``x [M, K]`` (M <= 16), ``weight [N, K]`` contiguous; with ``silu_mul``,
    ``x`` is ``[M, 2K]`` (gate, up) and the product is ``(silu(gate) * up) @ weight.T``."""
    rows, width = x.shape
    n, k = weight.shape
    if rows > MAX_ROWS or (width != 2 * k if silu_mul else width != k):
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} with weight {tuple(weight.shape)} (silu_mul={silu_mul})")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    args = (x, weight, out, rows, n, k, x.stride(0), weight.stride(0), out.stride(0))
    # float32 weights: exact dots (TF32 would cost ~1e-3); bf16/fp16 are exact either way.
    options = {"SILU_MUL": silu_mul, "PRECISION": "ieee" if weight.dtype == torch.float32 else "tf32"}
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter: no device to autotune on
        _skinny_jit[grid](*args, **options, BLOCK_N=16, BLOCK_K=64)
    else:
        _skinny_kernel[grid](*args, **options)
    return out


class LinearChoice:
    """Per (M, N, K, silu_mul): the Triton kernel or cuBLAS (F.linear), whichever the device runs faster.

    ``measure`` times both for the decode step's shapes on the GPU, once, at start-up
    (service/decode/kernel_choice.py); until then (and on the CPU, and for larger M) every product
    goes to F.linear."""

    def __init__(self) -> None:
        self.skinny = KernelChoice("decode projections (M, N, K, silu_mul), cuBLAS vs the skinny Triton GEMM")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, *, activation=None) -> torch.Tensor:
        """``x @ weight.T``; with ``activation`` (silu(gate) * up, applied to x's two halves first)
        fused into the kernel's loads where the kernel is chosen."""
        silu_mul = activation is not None
        if (x.shape[0], weight.shape[0], weight.shape[1], silu_mul) in self.skinny:
            return skinny_linear(x, weight, silu_mul=silu_mul)
        if silu_mul:
            x = activation(*x.chunk(2, dim=-1))
        return F.linear(x, weight)

    @torch.no_grad()
    def measure(self, weights: list[tuple[torch.Tensor, bool]], batch_sizes: list[int], activation) -> None:
        """Time cuBLAS (after ``activation`` where the weight's flag says silu_mul, as the step runs
        it) and the kernel for every weight at each batch size M <= 16 (CUDA only)."""
        if not weights or weights[0][0].device.type != "cuda" or not gemv_available():
            return
        for weight, silu_mul in weights:
            n, k = weight.shape
            act = activation if silu_mul else None
            for rows in sorted({m for m in batch_sizes if m <= MAX_ROWS}):
                x = torch.randn(rows, 2 * k if silu_mul else k, device=weight.device, dtype=weight.dtype)
                self.skinny.measure((rows, n, k, silu_mul), lambda: self._cublas(x, weight, act),
                                    {"skinny": lambda: skinny_linear(x, weight, silu_mul=silu_mul)}, tolerance=2e-2)
        self.skinny.report()

    @staticmethod
    def _cublas(x: torch.Tensor, weight: torch.Tensor, activation) -> torch.Tensor:
        if activation is not None:
            x = activation(*x.chunk(2, dim=-1))
        return F.linear(x, weight)


if triton is not None:

    # A few tile shapes, timed briefly (a start-up cost), the choice cached on disk with the compiled kernels.
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in ((16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                                   (64, 128, 4, 3), (64, 64, 4, 4), (16, 512, 8, 2), (32, 512, 8, 2))]

    @triton.jit
    def _skinny_jit(X, W, OUT, M, N, K, stride_xm, stride_wn, stride_om, SILU_MUL: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, 16)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < M
        col_ok = offs_n < N
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
            x_mask = row_ok[:, None] & k_ok[None, :]
            if SILU_MUL:  # x holds gate then up: the MLP's activation, applied as the tile is loaded
                gate = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
                up = tl.load(x_ptrs + K, mask=x_mask, other=0.0).to(tl.float32)
                x = (gate / (1.0 + tl.exp(-gate)) * up).to(W.dtype.element_ty)
            else:
                x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    def _brief_bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    try:
        _skinny_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "SILU_MUL"], do_bench=_brief_bench,
                                         cache_results=True)(_skinny_jit)
    except TypeError:  # an older Triton: its own (longer) timing, nothing cached
        _skinny_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "SILU_MUL"])(_skinny_jit)
