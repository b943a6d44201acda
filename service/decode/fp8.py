"""Qwen's FP8 checkpoints in the decoder: block-scaled float8 linears and the GEMM each device runs.

The layout (Qwen/Qwen3-VL-*-FP8, DeepSeek-V3's format): a decoder linear's weight is
``float8_e4m3fn [out, in]`` with ``weight_scale_inv`` ``float32 [ceil(out/128), ceil(in/128)]``,
one scale per 128 x 128 block; the weight it stands for is ``fp8 * scale``, block by block. The
vision tower, embeddings, norms and lm_head stay bf16. :class:`Fp8Linear` keeps the weights in
FP8 on the device (1 byte a weight, plus 4 bytes per 16384) and never makes a bf16 copy of them.

Which GEMM a device takes (:func:`gemm_for`, logged at load; docs/SERVICE.md has the table):

- CPU: dequantize the weight per call and ``F.linear`` (CI's path; the tests' reference);
- CUDA, compute capability 7.5-8.8 (Turing, Ampere): Triton, bf16/fp16 activations times FP8
  weights dequantized in registers (``weight_only``), at every batch size;
- CUDA 8.9+ (Ada, Hopper, Blackwell): the same weight-only kernel for up to
  ``WEIGHT_ONLY_MAX_ROWS`` rows (the decode step: it reads each weight once and is bound by
  bandwidth, where quantizing the activations is only an extra kernel), and FP8 tensor cores above
  (prefill chunks): activations quantized per token and 128 columns (dynamic, as vLLM does for
  this format), times the FP8 weights, both scales applied per block: ``torch._scaled_mm`` on
  Hopper (cuBLASLt's 1x128 x 128x128 block scaling is sm_90 only), a Triton kernel elsewhere;
- below 7.5, or CUDA without Triton: refused (:class:`Fp8Unsupported`).

For the decode step's shapes (each projection at each batch size up to ``WEIGHT_ONLY_MAX_ROWS``)
the engine's start-up times the weight-only kernel against its variants (the skinny kernel, the
product in fp16; ``TritonGemm.measure``) and keeps the fastest per shape on this GPU. Each kernel
is checked at load on a small problem against the torch reference; one that fails (a Triton or
driver that cannot build it) is dropped with a warning: the hardware decode of the FP8 bytes falls
back to the integer one, and the weight-only kernel failing with both refuses the checkpoint.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from service.decode.kernel_choice import KernelChoice

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest float8_e4m3fn
BLOCK = 128  # rows and columns of one weight scale block; also the activations' quantization group
AMAX_FLOOR = 1e-10  # an all-zero activation group gets this amax (any scale reproduces zeros)
# Rows up to which CUDA 8.9+ keeps to the weight-only kernel: every decode batch (the engine
# captures 1..32). The bench (bench/fp8_kernels.py) times both kernels at every M on the real shapes.
WEIGHT_ONLY_MAX_ROWS = 32
SCALED_MM_ROWS = 16  # torch._scaled_mm's activations are padded to a multiple of this many rows


class Fp8Unsupported(RuntimeError):
    """No FP8 GEMM runs on this device (the message says why and what to use instead)."""


def scale_shape(out_features: int, in_features: int, block: int = BLOCK) -> tuple[int, int]:
    return -(-out_features // block), -(-in_features // block)


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """Each block's scale repeated over its ``block x block`` elements, cut to ``[rows, cols]``."""
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> FP8 weight and float32 ``weight_scale_inv``: scale = amax / 448 per
    block (a block of zeros gets 1), FP8 = weight / scale rounded to nearest."""
    rows, cols = weight.shape
    w = weight.detach().float()
    padded = F.pad(w, (0, -cols % block, 0, -rows % block))
    amax = padded.abs().view(padded.shape[0] // block, block, padded.shape[1] // block, block).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / expand_blocks(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_blockwise(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                         block: int = BLOCK) -> torch.Tensor:
    """The weight an FP8 weight and its block scales stand for, in ``dtype`` (via float32)."""
    return (weight.float() * expand_blocks(scale, *weight.shape, block)).to(dtype)


def quantize_activations(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> FP8 ``[M, K]`` and float32 scales ``[M, ceil(K/group)]``: per token and
    ``group`` columns, scale = max(amax, floor) / 448 (the W8A8 path's dynamic activations)."""
    rows, cols = x.shape
    padded = F.pad(x.float(), (0, -cols % group))
    groups = padded.view(rows, -1, group)
    scale = groups.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(rows, -1)[:, :cols]
    return q, scale


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the FP8 tensor-core path computes, in float32 torch: quantized activations (with their
    scales) times the block-scaled weight; in ``x``'s dtype."""
    q, q_scale = quantize_activations(x)
    rows, cols = q.shape
    activations = q.float() * q_scale.repeat_interleave(BLOCK, 1)[:, :cols]
    return (activations @ dequantize_blockwise(weight, scale, torch.float32).T).to(x.dtype)


Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Fp8Linear(nn.Module):
    """A bias-free linear whose weight is FP8 with 128x128 block scales (Qwen's checkpoint names:
    ``weight``, ``weight_scale_inv``). ``gemm(x [M, in], weight, scale) -> [M, out]`` is the
    device's (:func:`gemm_for`), shared by every layer."""

    def __init__(self, in_features: int, out_features: int, gemm: Gemm, *, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(out_features, in_features), dtype=torch.float32, device=device),
            requires_grad=False)
        self.gemm = gemm

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, scale: torch.Tensor, gemm: Gemm) -> "Fp8Linear":
        """A module over these tensors (not copied: views stay views)."""
        module = cls(weight.shape[1], weight.shape[0], gemm, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return self.gemm(flat, self.weight, self.weight_scale_inv).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks of {BLOCK}"


def quantize_linears(model: nn.Module, names: list[str], gemm: Gemm) -> None:
    """Replace the ``nn.Linear`` modules ``names`` of ``model`` by :class:`Fp8Linear` quantized from
    their weights (in place, on their device): random-weight FP8 models for the tiny checkpoint
    writer and the benchmark."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear or linear.bias is not None:
            raise ValueError(f"{name} is not a bias-free nn.Linear")
        weight, scale = quantize_blockwise(linear.weight)
        setattr(model.get_submodule(parent), attr, Fp8Linear.from_tensors(weight, scale, gemm))
        del linear


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every :class:`Fp8Linear` of ``model`` by an ``nn.Linear`` holding its dequantized
    weight in ``dtype``: the same model in full precision (tests and the accuracy benchmark)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Fp8Linear):
            parent, _, attr = name.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(dequantize_blockwise(module.weight, module.weight_scale_inv, dtype),
                                         requires_grad=False)
            setattr(model.get_submodule(parent) if parent else model, attr, linear)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """The text decoder layers' linear projections (what Qwen's FP8 checkpoints quantize)."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and ".language_model.layers." in f".{name}"]


# ---- the device's GEMM ------------------------------------------------------------------------

def dequantize_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The CPU path (and any device's reference): dequantize the whole weight, then ``F.linear``."""
    return F.linear(x, dequantize_blockwise(weight, scale, x.dtype))


class TritonGemm:
    """CUDA: the weight-only Triton kernel up to ``weight_only_max_rows`` rows (every size without
    FP8 tensor cores), the FP8 tensor-core path above; see the module docstring."""

    def __init__(self, device: torch.device, *, fp8_tensor_cores: bool, scaled_mm: bool,
                 weight_only_max_rows: int = WEIGHT_ONLY_MAX_ROWS):
        from service.decode import fp8_kernels

        self.kernels = fp8_kernels
        self.device = device
        self.fp8_tensor_cores = fp8_tensor_cores
        self.scaled_mm = scaled_mm and fp8_tensor_cores
        self.weight_only_max_rows = weight_only_max_rows
        self.decode = KernelChoice("FP8 decode projections (M, N, K, dtype), the weight-only kernel vs its variants")
        # The candidates for a decode step's shape: the same math, another kernel or product dtype
        # (the fp16 product for bf16 activations only: fp16 ones are products in fp16 already).
        self.variants = {
            "weight-only, fp16 product": lambda x, w, s: self.kernels.weight_only_matmul(x, w, s, dot_f16=True),
            "skinny": lambda x, w, s: self.kernels.skinny_matmul(x, w, s, dot_f16=False),
            "skinny, fp16 product": lambda x, w, s: self.kernels.skinny_matmul(x, w, s, dot_f16=True),
        }

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        variant = self.decode.get((x.shape[0], *weight.shape, x.dtype))
        if variant is not None:
            return self.variants[variant](x, weight, scale)
        if not self.fp8_tensor_cores or x.shape[0] <= self.weight_only_max_rows:
            return self.kernels.weight_only_matmul(x, weight, scale)
        return self.w8a8(x, weight, scale)

    @torch.no_grad()
    def measure(self, weights: list[tuple[torch.Tensor, torch.Tensor]], batch_sizes: list[int],
                dtype: torch.dtype) -> None:
        """For the decode step's shapes (one layer's projections at each batch size the weight-only
        kernel takes, activations of ``dtype``): time it and its variants (service/decode/kernel_choice.py)
        and keep the fastest that agrees (the skinny kernel up to 16 rows; the fp16 product for bf16)."""
        for weight, scale in weights:
            for rows in sorted({m for m in batch_sizes if m <= self.weight_only_max_rows}):
                x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=dtype)
                candidates = {name: (lambda f=f: f(x, weight, scale)) for name, f in self.variants.items()
                              if (rows <= 16 or not name.startswith("skinny"))
                              and (dtype == torch.bfloat16 or "fp16" not in name)}
                self.decode.measure((rows, *weight.shape, dtype), lambda: self.kernels.weight_only_matmul(x, weight, scale),
                                    candidates, tolerance=1e-2)
        self.decode.report()

    def w8a8(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """FP8 tensor cores at any row count (the benchmark times it against the weight-only kernel)."""
        # cuBLASLt wants 16-byte aligned rows of scales (K/128 a multiple of 4), whole blocks of N, and
        # rows in multiples of 4 (seen on an H200, torch 2.11: 33 rows are CUBLAS_STATUS_NOT_SUPPORTED;
        # 4, 8, 64 and 1024 run): the activations are padded to a multiple of 16 rows for it.
        rows = x.shape[0]
        use_scaled_mm = self.scaled_mm and x.shape[1] % (4 * BLOCK) == 0 and weight.shape[0] % BLOCK == 0
        if use_scaled_mm and rows % SCALED_MM_ROWS:
            x = F.pad(x, (0, 0, 0, -rows % SCALED_MM_ROWS))
        q, q_scale = self.kernels.quantize_activations(x, column_major_scales=use_scaled_mm)
        if use_scaled_mm:
            try:
                return torch._scaled_mm(q, weight.t(), scale_a=q_scale, scale_b=scale.t(), out_dtype=x.dtype)[:rows]
            except RuntimeError as exc:  # a shape cuBLASLt's heuristics refuse (nothing ran): the Triton kernel
                log.warning("torch._scaled_mm refused %s x %s (%s); the Triton FP8 GEMM instead", tuple(x.shape),
                            tuple(weight.shape), exc)
        return self.kernels.block_matmul(q, q_scale, weight, scale, x.dtype)[:rows]

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device)
        major, minor = torch.cuda.get_device_capability(self.device)
        if not self.fp8_tensor_cores:
            return f"{name} (sm_{major}{minor}): Triton weight-only GEMM (FP8 weights dequantized in registers)"
        large = "torch._scaled_mm (cuBLASLt block scaling)" if self.scaled_mm else "Triton block-scaled FP8 GEMM"
        return (f"{name} (sm_{major}{minor}): up to {self.weight_only_max_rows} rows Triton weight-only GEMM, "
                f"above FP8 tensor cores: activations per token x {BLOCK} columns, {large}")

    def check(self) -> None:
        """Run each path on a small problem against the torch reference; drop the ones that fail."""
        generator = torch.Generator(device=self.device).manual_seed(0)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16

        def problem(rows: int, cols: int, out: int):
            x = torch.randn(rows, cols, device=self.device, generator=generator).to(dtype)
            w, s = quantize_blockwise(torch.randn(out, cols, device=self.device, generator=generator) * 0.05)
            return x, w, s

        def error(y: torch.Tensor, ref: torch.Tensor) -> float:
            return ((y.float() - ref.float()).norm() / ref.float().norm()).item()

        def weight_only_runs() -> None:  # every row-count configuration; partial blocks in N and K
            for rows in (1, 24, 100):
                x, w, s = problem(rows, 320, 200)
                err = error(self.kernels.weight_only_matmul(x, w, s), dequantize_gemm(x, w, s))
                if not err < 1e-2:
                    raise RuntimeError(f"relative error {err:.3g} at {rows} rows")

        try:
            try:
                weight_only_runs()
            except Exception as exc:  # noqa: BLE001 - a Triton that cannot build the hardware decode here
                if not self.kernels.native_decode(self.device):
                    raise
                log.warning("the hardware FP8 decode does not run on this GPU (%s: %s); the integer decode instead",
                            type(exc).__name__, exc)
                self.kernels.disable_native_decode(self.device)
                weight_only_runs()
        except Exception as exc:
            raise Fp8Unsupported(f"the FP8 weight-only Triton kernel does not run on this GPU ({type(exc).__name__}: "
                                 f"{exc}); use the bf16 checkpoint") from exc
        for name in [n for n in self.variants if "fp16" in n and dtype == torch.bfloat16]:  # past fp16's 65504
            try:
                x, w, s = problem(2, 384, 96)
                x[:, 5] = 1e5
                if not error(self.variants[name](x, w, s), dequantize_gemm(x, w, s)) < 1e-2:
                    raise RuntimeError("a bf16 activation of 1e5 comes out wrong")
            except Exception as exc:  # noqa: BLE001 - the variant is left out; the others remain
                log.warning("FP8 decode variant %r unavailable on this GPU (%s: %s)", name, type(exc).__name__, exc)
                del self.variants[name]
        if not self.fp8_tensor_cores:
            return
        for path, shape in (("scaled_mm", (100, 512, 256)), ("block", (100, 320, 200))):
            if path == "scaled_mm" and not self.scaled_mm:
                continue
            try:
                x, w, s = problem(*shape)
                err = error(self.w8a8(x, w, s), w8a8_reference(x, w, s))
                if not err < 2e-2:
                    raise RuntimeError(f"relative error {err:.3g}")
            except Exception as exc:  # noqa: BLE001 - a path this torch/Triton/driver cannot run
                log.warning("FP8 %s GEMM unavailable on this GPU (%s: %s); using the next path", path,
                            type(exc).__name__, exc)
                if path == "scaled_mm":
                    self.scaled_mm = False
                else:
                    self.fp8_tensor_cores = False


def gemm_for(device: torch.device) -> Gemm:
    """The FP8 GEMM for ``device``, checked; raises :class:`Fp8Unsupported` where none runs."""
    if device.type == "cpu":
        return dequantize_gemm
    if device.type != "cuda":
        raise Fp8Unsupported(f"FP8 weights run on CUDA GPUs and the CPU, not on {device.type}")
    from service.decode.fp8_kernels import triton_available

    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 5):
        raise Fp8Unsupported(f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is older "
                             "than Turing (7.5), the oldest GPU the FP8 kernels support; use the bf16 checkpoint")
    if not triton_available():
        raise Fp8Unsupported("FP8 weights on CUDA need Triton (it ships with torch's CUDA wheels); "
                             "install it or use the bf16 checkpoint")
    gemm = TritonGemm(device, fp8_tensor_cores=(major, minor) >= (8, 9), scaled_mm=major == 9)
    gemm.check()
    return gemm


def model_gemm(model: nn.Module) -> Gemm | None:
    """The FP8 GEMM of a model's :class:`Fp8Linear` modules (None: no FP8 weights)."""
    return next((m.gemm for m in model.modules() if isinstance(m, Fp8Linear)), None)


def describe(gemm: Gemm) -> str:
    """One line for the log: which path this GEMM takes."""
    if isinstance(gemm, TritonGemm):
        return gemm.describe()
    return "CPU: weights dequantized per call (torch)"
