"""Decode speed of a real-size random-weight Qwen3-VL: transformers' eager decode vs service.decode,
and the service's own engine.

For each model size: device copy bandwidth and the weight bytes one decode step reads (the roofline),
then for the issue's request (one 1280x704 image + 40 text tokens, 128 new tokens):
time to first token, decode tok/s of ``model.generate`` (baseline), of our step run eagerly and of
our step replayed from CUDA graphs (each optimisation added in turn), aggregate tok/s at batch 1/4/8,
peak memory; then the service's engine in a fresh process (bench/engine_bench.py): time to ready,
TTFT, decode and aggregate tok/s at 1/4/8 concurrent requests, peak process memory (NVML) against
the budget. One table at the end.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from bench.engine_bench import engine_rows
from bench.measure import GIB, Memory, clock, copy_bandwidth, text_weight_bytes, weight_bytes
from bench.workload import Workload, build_inputs, build_model
from bench.hf_prefill import load_prefill, prefill
from service.decode import DecodeRunner, Qwen3VLDecoder, PagedKVCache
from service.decode.attention import triton_available


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def hf_generate(model, inputs: dict, new_tokens: int, **extra):
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None, **extra)


def hf_decode(model, inputs: dict, new_tokens: int, device) -> tuple[float, float]:
    """transformers' eager generate: (time to first token, decode tok/s per sequence)."""
    hf_generate(model, inputs, 4)  # warm-up
    with clock(device) as first:
        hf_generate(model, inputs, 1)
    with clock(device) as full:
        hf_generate(model, inputs, new_tokens)
    return first[0], (new_tokens - 1) / (full[0] - first[0])


def our_decode(model, runner: DecodeRunner, inputs: dict, new_tokens: int, device,
               pipelined: bool = False) -> tuple[float, float, list]:
    """transformers' prefill copied into the slots (bench/hf_prefill.py; the engine's own prefill is
    timed by the engine rows), then our greedy decode loop: (prefill seconds, aggregate decode tok/s,
    tokens per row).

    Default: the host reads each step's tokens before the next step (an engine that samples and
    streams on the host). ``pipelined``: each step's argmax stays on the device and feeds the next
    step; the host reads the tokens afterwards (an engine that streams one step behind)."""
    cache = runner.cache
    with clock(device) as first:
        pf = prefill(model, **inputs)
        slots = [cache.allocate() for _ in pf.lengths]
        for row, slot in enumerate(slots):
            load_prefill(cache, slot, pf.past_key_values, pf.lengths[row], row=row, rope_delta=pf.rope_deltas[row])
        tokens = pf.logits.argmax(-1)
        generated = [tokens.tolist()]
    del pf
    with clock(device) as decode:
        if pipelined:
            steps = []
            for _ in range(new_tokens - 1):
                tokens = runner.decode(slots, tokens).argmax(-1)
                steps.append(tokens)
            generated += torch.stack(steps).tolist() if steps else []
        else:
            tokens = generated[0]
            for _ in range(new_tokens - 1):
                tokens = runner.decode(slots, tokens).argmax(-1).tolist()
                generated.append(tokens)
    for slot in slots:
        cache.free(slot)
    return first[0], len(slots) * (new_tokens - 1) / decode[0], [list(r) for r in zip(*generated)]


def agreement(model, runner: DecodeRunner, inputs: dict, steps: int) -> str:
    """How close our logits are to transformers' at the first steps (same prefill, greedy)."""
    out = hf_generate(model, inputs, steps, output_logits=True, return_dict_in_generate=True)
    reference = torch.stack(out.logits)[:, 0].float()
    ref_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    cache = runner.cache
    pf = prefill(model, **inputs)
    slot = cache.allocate()
    load_prefill(cache, slot, pf.past_key_values, pf.lengths[0], rope_delta=pf.rope_deltas[0])
    logits, diffs = pf.logits[0], []
    for step in range(steps):
        diffs.append((logits - reference[step]).abs().max().item())
        if step + 1 == steps or int(logits.argmax()) != ref_tokens[step]:
            break
        logits = runner.decode([slot], [ref_tokens[step]])[0]
    cache.free(slot)
    scale = reference.abs().max().item()
    return f"{len(diffs)} steps, max abs diff {max(diffs):.3g} (logits up to {scale:.3g})"


class LiveRow(dict):
    """A table column that also prints each figure as it is measured, so a run cut short still shows them."""

    def __init__(self, size: str):
        super().__init__()
        self.size = size
        self.roofline: float | None = None

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key, value)
        say(f"{self.size}: {key}: {value}")


def bench_model(size: str, args, device: torch.device, dtype: torch.dtype, workload: Workload,
                bandwidth: float) -> "LiveRow":
    """All figures for one model size (a column of the table)."""
    row = LiveRow(size)
    memory = Memory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    say(f"{size}: building a random-weight model on {device} ({dtype})")
    model, build_s = build_model(size, str(device), dtype)
    weights, per_step = weight_bytes(model), text_weight_bytes(model)
    row["model build (random weights)"] = f"{build_s:.1f} s"
    row["weights on device"] = f"{weights / GIB:.2f} GiB"
    row["text weights read per decode step"] = f"{per_step / 1e9:.2f} GB"
    roofline = row.roofline = bandwidth * 1e9 / per_step
    row["device copy bandwidth (read+write)"] = f"{bandwidth:.0f} GB/s"
    row["roofline decode (bandwidth / bytes per step)"] = f"{roofline:.0f} tok/s"
    say(f"{size}: weights {weights / GIB:.2f} GiB, {per_step / 1e9:.2f} GB/step, copy {bandwidth:.0f} GB/s "
        f"-> roofline {roofline:.0f} tok/s")

    single = build_inputs(model, workload, 1)
    prompt_len = single["input_ids"].shape[1]
    row["prompt tokens (image + text) / new tokens"] = f"{prompt_len} / {workload.new_tokens}"
    slots = max(args.batches)
    cache = PagedKVCache(model.config, slots, args.max_len, dtype=dtype, device=device)
    row["KV cache (slots x max context)"] = f"{cache.nbytes / GIB:.2f} GiB ({slots} x {args.max_len})"
    runner = DecodeRunner(Qwen3VLDecoder(model, cache, attention="sdpa"))

    say(f"{size}: our decode step, eager")
    our_decode(model, runner, single, 8, device)  # warm-up
    ttft, eager_tok_s, eager_tokens = our_decode(model, runner, single, workload.new_tokens, device)
    row["TTFT, ours (prefill, batch 1)"] = f"{ttft:.3f} s"
    row["decode, ours eager (batch 1)"] = f"{eager_tok_s:.0f} tok/s ({eager_tok_s / roofline:.0%} of roofline)"
    row[f"agreement with transformers ({str(dtype).removeprefix('torch.')}, greedy)"] = agreement(model, runner, single, 8)

    # Variants, each adding to the previous one (fusing mutates the model's weight layout in place).
    variants = [("CUDA graphs", {"attention": "sdpa"})] if device.type == "cuda" and not args.no_graphs else []
    if not args.no_fuse:
        variants.append(("fused projections", {"fuse_projections": True, "attention": "sdpa"}))
    compiled = {"fuse_projections": not args.no_fuse, "compile_backend": "inductor"}
    if device.type == "cuda" and not args.no_compile:
        variants.append(("fused + compiled", {**compiled, "attention": "sdpa"}))
    if device.type == "cuda" and triton_available():
        variants.append(("+ split-KV attention", {**compiled, "attention": "triton"} if not args.no_compile
                         else {"fuse_projections": not args.no_fuse, "attention": "triton"}))
    label = "eager"
    for name, options in variants:
        try:
            reserved = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
            say(f"{size}: {name}: building the decoder, capturing graphs (compiling: {bool(options.get('compile_backend'))})")
            runner = DecodeRunner(Qwen3VLDecoder(model, cache, **options))
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                if options.get("fuse_projections") and name == "fused projections":
                    row["reserved memory change from fusing projections"] = \
                        f"{(torch.cuda.memory_reserved(device) - reserved) / GIB:+.2f} GiB"
                if not args.no_graphs:
                    our_decode(model, runner, single, 4, device)  # compiles (when compiling) outside the capture
                    runner.capture()
                    row[f"start-up: {name}"] = (
                        f"{runner.capture_seconds:.1f} s capture, {len(runner.graphs)} graphs" if runner.uses_cuda_graphs
                        else f"capture failed: {runner.capture_error}")
            label = name if runner.uses_cuda_graphs or device.type != "cuda" else f"{name} (eager: no graphs)"
            our_decode(model, runner, single, 8, device)  # warm-up (the first replays upload the graphs)
            _, tok_s, tokens = our_decode(model, runner, single, workload.new_tokens, device)
            row[f"decode, ours {label} (batch 1)"] = f"{tok_s:.0f} tok/s ({tok_s / roofline:.0%} of roofline)"
            row[f"tokens of ours {label} == ours eager"] = "yes" if tokens == eager_tokens else "NO (bf16 near-ties)"
            memory.sample()
        except Exception as exc:  # one variant failing must not hide the others' figures
            row[f"decode, ours {name}"] = f"failed: {type(exc).__name__}: {exc}"
    best = label
    if variants:
        row[f"agreement with transformers, {best}"] = agreement(model, runner, single, 8)
    single_tok_s = None
    for batch in args.batches:
        inputs = single if batch == 1 else build_inputs(model, workload, batch, seed=batch)
        for pipelined in (False, True):
            how = "pipelined" if pipelined else "host sync per step"
            say(f"{size}: ours ({best}, {how}), batch {batch}")
            our_decode(model, runner, inputs, 8, device, pipelined)  # warm-up
            ttft_b, tok_s, _ = our_decode(model, runner, inputs, workload.new_tokens, device, pipelined)
            if batch == 1 and not pipelined:
                single_tok_s = tok_s
            row[f"decode, ours {best}, {how} (batch {batch})"] = (
                f"{tok_s:.0f} tok/s ({tok_s / single_tok_s:.1f}x batch 1 sync)"
                + (f", prefill {ttft_b:.2f} s" if batch > 1 and not pipelined else ""))
            memory.sample()

    if device.type == "cuda":
        row["peak allocated (torch), ours"] = f"{memory.torch_peak_allocated / GIB:.2f} GiB"
        row["peak reserved (torch), ours"] = f"{memory.torch_peak_reserved / GIB:.2f} GiB"
    if memory.nvml_peak:
        row[f"peak NVML ({memory.nvml_note}), ours"] = f"{memory.nvml_peak / GIB:.2f} GiB"

    del runner, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if not args.skip_hf:
        say(f"{size}: transformers eager generate (baseline), batch 1")
        hf_ttft, hf_tok_s = hf_decode(model, single, workload.new_tokens, device)
        row["TTFT, transformers generate (batch 1)"] = f"{hf_ttft:.3f} s"
        row["decode, transformers generate (batch 1)"] = f"{hf_tok_s:.0f} tok/s ({hf_tok_s / roofline:.0%} of roofline)"
        if args.hf_batch > 1:
            say(f"{size}: transformers eager generate, batch {args.hf_batch}")
            _, hf_batch_tok_s = hf_decode(model, build_inputs(model, workload, args.hf_batch), workload.new_tokens, device)
            row[f"aggregate decode, transformers generate (batch {args.hf_batch})"] = \
                f"{hf_batch_tok_s * args.hf_batch:.0f} tok/s"
        if device.type == "cuda":
            row["peak allocated (torch), transformers"] = f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB"
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{date}; {gpu}; torch {torch.__version__}{cuda}; transformers {transformers.__version__}; "
            f"python {platform.python_version()}")


def table(results: dict[str, dict[str, str]]) -> str:
    names = list(results)
    metrics: list[str] = []
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        cells = [results[n].get(metric, "").replace("|", "/") for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="2b",
                        help="comma-separated shapes: 2b, 4b, 8b (default 2b); -fp8 (2b-fp8 ...): the decoder's "
                             "linears in Qwen's FP8 layout (128x128 block scales)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check on CPU with the tiny model, a small image and 8 new tokens")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (smoke: 8)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8; smoke: 1,2)")
    parser.add_argument("--max-len", type=int, default=None, help="KV slot length in tokens (default 2048; smoke 256)")
    parser.add_argument("--hf-batch", type=int, default=8, help="also time transformers' generate at this batch (1: skip)")
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers' generate baseline")
    parser.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    parser.add_argument("--no-fuse", action="store_true", help="do not measure fused q/k/v and gate/up weights")
    parser.add_argument("--no-compile", action="store_true", help="do not measure torch.compile'd elementwise kernels")
    parser.add_argument("--copy-gib", type=float, default=1.0, help="size of the bandwidth test tensor")
    parser.add_argument("--no-engine", action="store_true", help="skip the service engine's figures")
    parser.add_argument("--engine-concurrency", default=None, help="concurrent requests for the engine (default 1,4,8)")
    parser.add_argument("--engine-args", action="append", default=None, metavar="FLAGS",
                        help="service flags for the engine, e.g. '--memory-budget-gib 6'; repeat for several "
                             "configurations (labelled A, B, ... in the table)")
    parser.add_argument("--engine-starts", type=int, default=None,
                        help="engine starts (default 2: a cold then a warm compile cache; smoke: 1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlkit-smoke"),
                        help="random-weight checkpoints for the engine (shared with python -m service.smoke)")
    parser.add_argument("--out", default=None, help="also write the table here (default: $OUT/bench.md if $OUT is set)")
    args = parser.parse_args(argv)
    if args.smoke:  # the tiny model, or its FP8 layout with --models tiny-fp8
        args.models = args.models if args.models.startswith("tiny") else "tiny"
        args.device = args.device or "cpu"
    args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,4,8")).split(",")]
    if 1 not in args.batches:
        args.batches.insert(0, 1)
    args.max_len = args.max_len or (256 if args.smoke else 2048)
    args.engine_concurrency = [int(n) for n in (args.engine_concurrency or ("1,2" if args.smoke else "1,4,8")).split(",")]
    args.engine_starts = args.engine_starts or (1 if args.smoke else 2)
    args.hf_batch = 2 if args.smoke and args.hf_batch == 8 else args.hf_batch
    args.copy_gib = 0.125 if args.smoke else args.copy_gib
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    workload = (Workload(image_width=256, image_height=256, new_tokens=args.new_tokens) if args.smoke
                else Workload(new_tokens=args.new_tokens))
    say(environment(device))
    bandwidth = copy_bandwidth(device, gib=args.copy_gib)  # before any model: its buffers are then released
    say(f"device-to-device copy: {bandwidth:.0f} GB/s")
    results = {}
    for size in args.models.split(","):
        size = size.strip()
        row = results[size] = bench_model(size, args, device, dtype, workload, bandwidth)
        if not args.no_engine:
            configs = args.engine_args or [""]
            for index, flags in enumerate(configs):
                label = "engine" if len(configs) == 1 else f"engine {chr(ord('A') + index)}"
                starts = args.engine_starts
                say(f"{size}: the service's engine, in a fresh process ({starts} start(s)), flags: {flags or '-'}")
                try:
                    for metric, value in engine_rows(size, args, workload, row.roofline, args.workdir,
                                                     shlex.split(flags), starts, label):
                        row[metric] = value
                except Exception as exc:  # noqa: BLE001 - the decode figures above still stand
                    row[label] = f"failed: {type(exc).__name__}: {exc}"
    publish(f"Decode benchmark ({environment(device)})\n\n{table(results)}\n", args.out, "bench.md")
    return 0


def publish(report: str, out: str | None, name: str) -> None:
    """Print the report; write it to `out` too (default: $OUT/name when $OUT is set)."""
    print("\n" + report, flush=True)
    out = out or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report, encoding="utf-8")
        say(f"table written to {out}")


if __name__ == "__main__":
    sys.exit(main())
