"""The FP8 GEMMs against cuBLAS bf16 on the real projection shapes, at every row count:
``python -m bench.fp8_kernels [--models 2b,4b,8b] [--rows 1,2,4,8,16,32,64,1024]``.

For each model's fused q/k/v, o, fused gate/up and down projection and each M: microseconds per
call and the weight bytes streamed per second, for cuBLAS bf16 (``F.linear``), the Triton
weight-only kernels (split over K, and the skinny one for M <= 16) with each way of decoding the
weight bytes (integer operations; sm_89+'s conversion; the product in bf16 or fp16), the Triton
FP8 tensor-core kernel (activation quantization included) and, on Hopper, ``torch._scaled_mm``
with block scales (those two from M = 16: below it the weight-only kernels win, measured). Each figure is the median CUDA-graph replay over
copies of the weight that together exceed the L2 cache, so every call reads its weight from
memory, as a decode step does. The last column names the fastest FP8 path: where the service's
``WEIGHT_ONLY_MAX_ROWS`` (service/decode/fp8.py) should sit.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.measure import copy_bandwidth
from bench.profile_step import graph_time
from service.decode import fp8_kernels
from service.decode.fp8 import TritonGemm, quantize_blockwise
from service.model_shapes import shape as model_shape

L2_FLUSH_BYTES = 256 * 1024**2  # weights rotated per timing: several times an H200's 60 MB L2
ROWS = (1, 8, 16, 32, 64, 1024)


def projection_shapes(size: str) -> dict[str, tuple[int, int]]:
    """(out, in) of one decoder layer's projections as the engine runs them (q/k/v, gate/up fused)."""
    text = model_shape(size)["text_config"]
    hidden, q, kv = text["hidden_size"], text["num_attention_heads"] * text["head_dim"], \
        text["num_key_value_heads"] * text["head_dim"]
    inter = text["intermediate_size"]
    return {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def decodes(native_available: bool) -> list[tuple[str, bool, bool]]:
    """(name, native, dot_f16): the ways the weight-only kernels can decode FP8 bytes here."""
    ways = [("integer decode", False, False), ("integer decode, fp16 product", False, True)]
    if native_available:
        ways += [("native decode", True, False), ("native decode, fp16 product", True, True)]
    return ways


def graph_seconds(calls: list) -> float:
    """Seconds per call: all ``calls`` captured in one CUDA graph, the median replay."""
    return graph_time(lambda: [call() for call in calls], repeats=20) / len(calls)


def kernel_rows(sizes: list[str], rows: tuple[int, ...], device: torch.device) -> list[dict]:
    """One result per (model, projection, M): seconds per call of each path (None where it cannot run)."""
    gemm = TritonGemm(device, fp8_tensor_cores=torch.cuda.get_device_capability(device) >= (8, 9),
                      scaled_mm=torch.cuda.get_device_capability(device)[0] == 9)
    gemm.check()
    native_fp8 = torch.cuda.get_device_capability(device) >= (8, 9)  # the hardware decodes e4m3
    results = []
    for size in sizes:
        for name, (out_features, in_features) in projection_shapes(size).items():
            weights = out_features * in_features
            dense = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
                     for _ in range(max(2, -(-L2_FLUSH_BYTES // (2 * weights))))]
            quantized = [quantize_blockwise(dense[i % len(dense)])
                         for i in range(max(2, -(-L2_FLUSH_BYTES // weights)))]
            for m in rows:
                x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
                paths = {"bf16 cuBLAS": [lambda w=w: F.linear(x, w) for w in dense]}
                for decode, native, dot_f16 in decodes(native_fp8):
                    paths[f"weight-only, {decode}"] = [
                        lambda w=w, s=s, n=native, d=dot_f16: fp8_kernels.weight_only_matmul(x, w, s, native=n, dot_f16=d)
                        for w, s in quantized]
                    if m <= 16 and native == native_fp8:
                        paths[f"skinny, {decode}"] = [
                            lambda w=w, s=s, n=native, d=dot_f16: fp8_kernels.skinny_matmul(x, w, s, native=n, dot_f16=d)
                            for w, s in quantized]
                if gemm.fp8_tensor_cores and m >= 16:
                    triton_w8a8 = TritonGemm(device, fp8_tensor_cores=True, scaled_mm=False)
                    paths["FP8 tensor cores (Triton)"] = [lambda w=w, s=s: triton_w8a8.w8a8(x, w, s)
                                                          for w, s in quantized]
                if gemm.scaled_mm and m >= 16:
                    paths["FP8 tensor cores (_scaled_mm)"] = [lambda w=w, s=s: gemm.w8a8(x, w, s) for w, s in quantized]
                seconds = {}
                for path, calls in paths.items():
                    try:
                        seconds[path] = graph_seconds(calls)
                    except Exception as exc:  # noqa: BLE001 - one path failing must not hide the others
                        print(f"[fp8-kernels] {size} {name} M={m} {path}: {type(exc).__name__}: {exc}", flush=True)
                        seconds[path] = None
                results.append({"model": size, "projection": name, "shape": (out_features, in_features), "rows": m,
                                "seconds": seconds})
            del dense, quantized
            torch.cuda.empty_cache()
    return results


def kernel_table(results: list[dict]) -> str:
    paths = list(dict.fromkeys(p for r in results for p in r["seconds"]))
    lines = ["| model: projection (out x in) | M | " + " | ".join(f"{p}: us (GB/s)" for p in paths)
             + " | fastest FP8 |", "|---" * (len(paths) + 3) + "|"]
    for r in results:
        out_features, in_features = r["shape"]
        cells = []
        for path in paths:
            t = r["seconds"].get(path)
            weight_bytes = out_features * in_features * (2 if path.startswith("bf16") else 1)
            cells.append("n/a" if t is None else f"{t * 1e6:.1f} ({weight_bytes / t / 1e9:.0f})")
        fp8 = {p: t for p, t in r["seconds"].items() if t is not None and not p.startswith("bf16")}
        best = min(fp8, key=fp8.get) if fp8 else "-"
        lines.append(f"| {r['model']}: {r['projection']} ({out_features} x {in_features}) | {r['rows']} | "
                     + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,4b,8b")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name(device)}: device copy {copy_bandwidth(device):.0f} GB/s (read + write)")
    results = kernel_rows(args.models.split(","), tuple(int(m) for m in args.rows.split(",")), device)
    print(kernel_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
