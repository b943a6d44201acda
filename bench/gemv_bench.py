"""The decode step's projections at batch 1..16 on this GPU: cuBLAS (F.linear) against the skinny
Triton kernel (service/decode/gemv.py), as bandwidth: ``python -m bench.gemv_bench [--models 2b,4b]``.

Random bf16 weights of the real Qwen3-VL shapes; each figure is device time per call inside a CUDA
graph (as the decode step runs them), after the kernel's autotuning. Prints one table; the engine makes the same comparison at start-up and
keeps the faster per shape.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.measure import copy_bandwidth
from service.decode.gemv import skinny_linear
from service.decode.kernel_choice import graph_time
from service.model_shapes import shape


def projections(name: str) -> list[tuple[str, int, int, bool]]:
    """(label, N, K, silu_mul) of one decoder layer's fused projections."""
    text = shape(name)["text_config"]
    hidden, inter, heads, kv, dim = (text["hidden_size"], text["intermediate_size"], text["num_attention_heads"],
                                     text["num_key_value_heads"], text["head_dim"])
    return [("qkv", (heads + 2 * kv) * dim, hidden, False), ("o_proj", hidden, heads * dim, False),
            ("gate_up", 2 * inter, hidden, False), ("down (+silu_mul)", hidden, inter, True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="2b,4b")
    parser.add_argument("--rows", default="1,2,4,8,16")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth(torch.device("cuda")) * 1e9  # bytes/s
    print(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s ({torch.cuda.get_device_name()})")
    print("| model | projection | N x K | M | cuBLAS us | Triton us | cuBLAS % BW | Triton % BW | faster |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for label, n, k, silu in projections(model):
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)

                def cublas():
                    inp = F.silu(x[:, :k]) * x[:, k:] if silu else x
                    return F.linear(inp, weight)

                ours = skinny_linear(x, weight, silu_mul=silu)  # autotunes
                error = ((ours.float() - cublas().float()).norm() / cublas().float().norm()).item()
                a, b = graph_time(cublas, 20), graph_time(lambda: skinny_linear(x, weight, silu_mul=silu), 20)
                moved = weight.numel() * 2
                print(f"| {model} | {label} | {n} x {k} | {rows} | {a:.1f} | {b:.1f} | {moved / (a * 1e-6) / bandwidth:.0%} "
                      f"| {moved / (b * 1e-6) / bandwidth:.0%} | {'Triton' if b < a else 'cuBLAS'}"
                      f"{'' if error < 2e-2 else f' (MISMATCH {error:.1e})'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
