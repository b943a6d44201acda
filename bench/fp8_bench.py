"""Qwen's FP8 checkpoints in the 8gb service, measured on the GPU in one command:
``python -m bench.fp8_bench [--models 2b,4b,8b] [--accuracy 2b,4b] [--engine 2b,4b]``.

1. The FP8 GEMMs against cuBLAS bf16 on the real projection shapes at M = 1..1024
   (bench/fp8_kernels.py): the second table.
2. Per shape, a random-weight model built on the GPU in bf16, then quantized blockwise to FP8 in
   place: the text weights one decode step reads (bf16 / FP8), the roofline on this GPU (copy
   bandwidth / bytes per step) and predicted on an RTX 5060 (448 GB/s) and an RTX 4060
   (272 GB/s), and decode tok/s at batch 1 and 8 for both, through the engine's decode step
   (fused projections, compiled elementwise kernels, split-KV attention, CUDA graphs; pipelined:
   each step's tokens read one step behind, as the engine does): FP8 / bf16 and FP8 against its
   roofline, the issue's targets (>= 1.6x where bandwidth-bound, >= 50% of the roofline).
3. Accuracy (bench/fp8_accuracy.py): FP8 against the bf16 model of the dequantized weights.
4. The service's engine on random-weight checkpoints written to disk, in a fresh process each
   (bench/engine_bench.py), with the settings ``vlkit plan --profile 8gb --gpu-memory CARD``
   gives them: ``--engine 4b-fp8@8GiB`` (a checkpoint in Qwen's FP8 layout on an 8 GiB card),
   ``8b@12GiB`` (the bf16 checkpoint, which the plan quantizes to nf4 there): time to ready,
   TTFT, decode at 1 and 8 concurrent requests, peak process memory against the budget.

One table at the end (also ``$OUT/fp8.md``). The in-process phases compile into the engine's
compile cache (``--workdir``), so the engines start with the kernels of the shapes seen before.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

CONSUMER_CARDS = {"RTX 5060": 448.0, "RTX 4060": 272.0}  # GB/s, NVIDIA's figures


def say(message: str) -> None:
    print(f"[fp8-bench] {message}", flush=True)


def decode_speed(model, inputs: dict[int, dict], new_tokens: int, max_len: int, device) -> dict[int, float]:
    """Pipelined decode tok/s (all rows together) of the engine's step at each batch size."""
    from bench.decode_bench import our_decode
    from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder

    batches = sorted(inputs)
    cache = PagedKVCache(model.config, max(batches), max_len, dtype=torch.bfloat16, device=device)
    decoder = Qwen3VLDecoder(model, cache, fuse_projections=True, compile_backend="inductor", attention="triton")
    runner = DecodeRunner(decoder, batch_sizes=batches, context_step=512)
    speeds = {}
    try:
        for batch in batches:
            our_decode(model, runner, inputs[batch], 4, device, pipelined=True)  # compiles outside the capture
        decoder.measure_projections(runner.batch_sizes)  # as the engine's start-up: the faster GEMM per shape
        runner.capture()
        if not runner.uses_cuda_graphs:
            raise RuntimeError(f"CUDA graph capture failed: {runner.capture_error}")
        for batch in batches:
            our_decode(model, runner, inputs[batch], 8, device, pipelined=True)  # the first replays
            speeds[batch] = our_decode(model, runner, inputs[batch], new_tokens, device, pipelined=True)[1]
    finally:
        del runner, decoder, cache
        gc.collect()
        torch.cuda.empty_cache()
    return speeds


def measure_shape(size: str, args, device, bandwidth: float, row: dict) -> None:
    """bf16 then FP8 (in place) decode for one architecture, and accuracy if asked: into ``row``."""
    from bench.fp8_accuracy import accuracy, describe
    from bench.measure import text_weight_bytes
    from bench.workload import Workload, build_inputs, build_model
    from service.decode.fp8 import decoder_linear_names, gemm_for, quantize_linears

    say(f"{size}: building a random-weight model (bf16)")
    model, build_s = build_model(size, str(device), torch.bfloat16)
    workload = Workload(new_tokens=args.new_tokens)
    inputs = {b: build_inputs(model, workload, b, seed=b) for b in (1, 8)}
    bf16_bytes = text_weight_bytes(model)
    bf16_resident = torch.cuda.memory_allocated(device)
    say(f"{size}: bf16 decode")
    bf16 = decode_speed(model, inputs, args.new_tokens, args.max_len, device)
    quantize_linears(model, decoder_linear_names(model), gemm_for(device))
    gc.collect()
    torch.cuda.empty_cache()
    fp8_bytes = text_weight_bytes(model)
    fp8_resident = torch.cuda.memory_allocated(device)  # no bf16 copy of the quantized weights left
    say(f"{size}: FP8 decode")
    fp8 = decode_speed(model, inputs, args.new_tokens, args.max_len, device)
    roofline = args.rooflines[size] = bandwidth * 1e9 / fp8_bytes
    row["model on the GPU (torch allocated): bf16 / FP8"] = \
        f"{bf16_resident / 2**30:.2f} / {fp8_resident / 2**30:.2f} GiB"
    row["text weights read per decode step: bf16 / FP8"] = f"{bf16_bytes / 1e9:.2f} / {fp8_bytes / 1e9:.2f} GB"
    row["roofline on this GPU: bf16 / FP8"] = f"{bandwidth * 1e9 / bf16_bytes:.0f} / {roofline:.0f} tok/s"
    for card, gbs in CONSUMER_CARDS.items():
        row[f"predicted roofline, {card} ({gbs:.0f} GB/s): bf16 / FP8"] = \
            f"{gbs * 1e9 / bf16_bytes:.0f} / {gbs * 1e9 / fp8_bytes:.0f} tok/s"
    for batch in (1, 8):
        row[f"decode, batch {batch}: bf16 / FP8 (FP8 / bf16)"] = \
            f"{bf16[batch]:.0f} / {fp8[batch]:.0f} tok/s ({fp8[batch] / bf16[batch]:.2f}x)"
    row["FP8 batch 1 against its roofline (target >= 50%)"] = f"{fp8[1] / roofline:.0%}"
    row["FP8 / bf16 at batch 1 (target >= 1.6x where bandwidth-bound)"] = f"{fp8[1] / bf16[1]:.2f}x"
    row["random-weight build"] = f"{build_s:.1f} s"
    if size in args.accuracy:
        say(f"{size}: accuracy over {args.steps} steps")
        row[f"accuracy: FP8 vs bf16 of the dequantized weights, {args.steps} greedy steps"] = describe(
            accuracy(model, inputs[1], args.steps))
    del model, inputs
    gc.collect()
    torch.cuda.empty_cache()


def engine_entry(entry: str, args, row: dict) -> None:
    """``4b-fp8@8GiB``: the engine on a checkpoint in Qwen's FP8 layout, ``8b@12GiB`` on the bf16
    checkpoint, each with the 8gb profile's plan for that card (its quantization included)."""
    from bench.engine_bench import checkpoint_for, engine_rows
    from bench.planned import Plan
    from bench.workload import Workload

    checkpoint, _, card = entry.partition("@")
    card = card or "8GiB"
    plan = Plan(checkpoint_for(checkpoint, args.workdir, "cuda"), "8gb", card)
    if not plan.fits:
        raise RuntimeError(f"vlkit plan --profile 8gb --gpu-memory {card} does not fit {checkpoint}")
    flags = plan.service_flags()
    say(f"{entry}: the service's engine, flags {' '.join(flags)}")
    options = SimpleNamespace(device="cuda", engine_concurrency=[1, 8], new_tokens=args.new_tokens)
    size = checkpoint.partition("-")[0]
    roofline = args.rooflines.get(size) if checkpoint.endswith("-fp8") else None
    for metric, value in engine_rows(checkpoint, options, Workload(new_tokens=args.new_tokens), roofline,
                                     args.workdir, flags, 1, label=f"engine {entry}"):
        row[metric] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,4b,8b", help="architectures for the bf16 / FP8 decode rows")
    parser.add_argument("--accuracy", default="2b,4b", help="architectures for the accuracy row")
    parser.add_argument("--engine", default="2b-fp8@8GiB,4b-fp8@8GiB",
                        help="engine runs: SIZE-fp8@CARD (FP8 checkpoint) or SIZE@CARD (bf16 checkpoint), each with "
                             "the 8gb plan for that card (nf4 where it plans nf4: needs bitsandbytes); '' for none")
    parser.add_argument("--kernel-models", default="2b,4b,8b", help="shapes of the kernel table ('' for none)")
    parser.add_argument("--kernel-rows", default="1,8,16,32,64,1024", help="M of the kernel table")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128, help="greedy steps of the accuracy row")
    parser.add_argument("--max-len", type=int, default=2048, help="KV slot length of the decode rows")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlkit-fp8"))
    args = parser.parse_args(argv)
    args.accuracy = [s for s in args.accuracy.split(",") if s]
    args.rooflines = {}
    args.workdir.mkdir(parents=True, exist_ok=True)
    cache = args.workdir / "compile-cache"  # the engine children's --compile-cache-dir (engine_bench)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    from bench.decode_bench import environment, table
    from bench.fp8_kernels import kernel_rows, kernel_table
    from bench.measure import copy_bandwidth
    from service.decode.fp8 import describe, gemm_for

    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.set_grad_enabled(False)
    say(environment(device))
    bandwidth = copy_bandwidth(device)
    path = describe(gemm_for(device))
    say(f"device copy {bandwidth:.0f} GB/s (read + write); FP8 path: {path}")
    kernels = ""
    if args.kernel_models:
        say("FP8 GEMMs against cuBLAS bf16")
        rows = tuple(int(m) for m in args.kernel_rows.split(","))
        kernels = kernel_table(kernel_rows(args.kernel_models.split(","), rows, device))
        print(kernels, flush=True)
    results: dict[str, dict[str, str]] = {}
    for size in [s for s in args.models.split(",") if s]:
        phase = time.perf_counter()
        row = results.setdefault(size, {})
        try:
            measure_shape(size, args, device, bandwidth, row)
        except Exception as exc:  # noqa: BLE001 - the other shapes' figures still stand
            row["failed"] = f"{type(exc).__name__}: {exc}"
        say(f"{size}: {time.perf_counter() - phase:.0f} s; {row}")
    for entry in [e for e in args.engine.split(",") if e]:
        phase = time.perf_counter()
        row = results.setdefault(entry.partition("-")[0], {})
        try:
            engine_entry(entry, args, row)
        except Exception as exc:  # noqa: BLE001
            row[f"engine {entry}"] = f"failed: {type(exc).__name__}: {exc}"
        say(f"{entry} engine: {time.perf_counter() - phase:.0f} s")
    report = (f"FP8 benchmark ({environment(device)}; copy {bandwidth:.0f} GB/s; FP8 path: {path}; "
              f"{time.perf_counter() - started:.0f} s)\n\n{table(results)}\n\n{kernels}\n")
    print("\n" + report, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fp8.md").write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
