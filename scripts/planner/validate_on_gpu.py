"""Check the planner against a real vLLM on a big GPU: emulate a smaller card, compare the KV cache.

Runs on a CUDA machine with vLLM installed (not part of the host CLI; nothing imports it):

    python -m scripts.planner.validate_on_gpu --out /tmp/validation            # 4b and 2b, 8/12/16 GiB
    python -m scripts.planner.validate_on_gpu --shape 4b --card 16GiB --out DIR

For each case it writes an offline checkpoint directory (config, a tokenizer whose special tokens sit
at Qwen's ids, Qwen3-VL's processor configs; no weights: vLLM loads dummy weights), asks the planner
for the card, converts --gpu-memory-utilization so vLLM requests the same bytes of this GPU as it
would of the emulated card, starts `vllm serve` with the planned flags, reads what vLLM logs
("Available KV cache memory", "GPU KV cache size", the profiling breakdown) and compares. A case
named "seeds" also evaluates vLLM's defaults at 0.80 of an 8 GiB card (the user's failing command).
What the emulation cannot reproduce: the other processes and CUDA context of a desktop card (the
free-memory start-up check), and a different GPU's kernels/workspaces.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.sizing import GIB

PATTERNS = {
    "available_kv_gib": r"Available KV cache memory: (-?[\d.]+) GiB",
    "kv_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "weights_gib": r"Model loading took ([\d.]+) GiB",
    "non_kv_gib": r"Total non KV cache memory: ([\d.]+)GiB",
    "torch_peak_increase_gib": r"torch peak memory increase: ([\d.]+)GiB",
    "cuda_graph_estimate_gib": r"CUDA graph pool memory: [\d.]+ GiB \(actual\), ([\d.]+) GiB \(estimated\)",
    "cuda_graph_actual_gib": r"CUDA graph pool memory: ([\d.]+) GiB \(actual\)",
    "encoder_budget": r"Encoder cache will be initialized with a budget of (\d+) tokens, and profiled with (\d+) image",
}
DONE = re.compile(r"GPU KV cache size|No available memory for the cache blocks|larger than the available KV cache"
                  r"|Application startup complete|Engine core initialization failed|Traceback")


def write_checkpoint(out: Path, shape: str, fp8: bool) -> Path:
    """config + tokenizer + processor files of the real architecture, no weights."""
    from service.tiny_model import build_config, build_tokenizer, write_processor

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(qwen_ids=True)
    config = build_config(shape, tok)
    if fp8:  # the layout of Qwen's -FP8 checkpoints (block-wise fp8 linears, vision tower in bf16)
        config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128], "modules_to_not_convert": ["visual", "lm_head"]}
    config.save_pretrained(out)
    write_processor(out, tok)
    return out


def gpu_total_bytes() -> int:
    import torch
    return torch.cuda.mem_get_info()[1]


def run_vllm(model_dir: Path, args: list[str], log_path: Path, timeout_s: float) -> str:
    cmd = ["vllm", "serve", str(model_dir), "--load-format", "dummy", "--host", "127.0.0.1",
           "--port", "18777", *args]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout_s
        try:
            while time.time() < deadline and proc.poll() is None:
                time.sleep(2)
                text = log_path.read_text(errors="replace")
                if DONE.search(text) and ("GPU KV cache size" not in text or "Maximum concurrency" in text):
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    return log_path.read_text(errors="replace")


def parse_log(text: str) -> dict:
    found = {}
    for key, pattern in PATTERNS.items():
        m = re.findall(pattern, text)
        if m:
            last = m[-1]
            found[key] = [int(x) for x in last] if isinstance(last, tuple) else float(last.replace(",", ""))
    found["error"] = next((line.strip() for line in text.splitlines()
                           if "No available memory for the cache blocks" in line
                           or "larger than the available KV cache" in line), None)
    return found


def emulate(args: list[str], card_bytes: int, total: int) -> tuple[list[str], float]:
    """Same requested bytes on this GPU as on the emulated card."""
    i = args.index("--gpu-memory-utilization")
    util = float(args[i + 1]) * card_bytes / total
    return args[:i + 1] + [f"{util:.4f}"] + args[i + 2:], util


def main(argv: list[str] | None = None) -> int:
    from scripts.planner import plan_for
    from scripts.planner.sizes import parse_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=("2b", "4b", "8b"), help="default: 4b and 2b")
    p.add_argument("--card", action="append", help="emulated card sizes (default: 8GiB 12GiB 16GiB)")
    p.add_argument("--fp8", action="store_true", help="plan and run the -FP8 layout (dummy fp8 weights)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args(argv)
    total = gpu_total_bytes()
    results = []
    for shape in a.shape or ["4b", "2b"]:
        model_id = f"Qwen/Qwen3-VL-{shape.upper()}-Instruct" + ("-FP8" if a.fp8 else "")
        model_dir = write_checkpoint(a.out / f"ckpt-{shape}{'-fp8' if a.fp8 else ''}", shape, a.fp8)
        cases = [(card, parse_size(card), None) for card in (a.card or ["8GiB", "12GiB", "16GiB"])]
        cases.append(("seeds", 8 * GIB, 0.80))
        for name, card, util in cases:
            if util is None:
                plan = plan_for(model=model_id, profile="16gb", gpu_memory_bytes=card)
                if not plan.fits:
                    results.append({"model": model_id, "card": name, "planned": "does not fit",
                                    "refusal": plan.refusal})
                    continue
                args = plan.vllm_args
            else:  # the user's command; vLLM's small-GPU defaults made explicit (this GPU is large)
                plan = plan_for(model=model_id, profile="16gb", gpu_memory_bytes=card,
                                gpu_memory_utilization=util, context=4096)
                args = plan.vllm_args + ["--max-num-seqs", "256", "--max-num-batched-tokens", "2048"]
            run_args, run_util = emulate(args, card, total)
            kv_row = next(r for r in plan.budget if r.name.strip() == "KV cache")
            log = run_vllm(model_dir, run_args, a.out / f"vllm-{shape}-{name}.log", a.timeout)
            seen = parse_log(log)
            result = {"model": model_id, "card": name, "util_on_this_gpu": run_util, "args": run_args,
                      "predicted_kv_gib": kv_row.gib, "predicted_kv_tokens": plan.kv_cache_tokens,
                      "predicted": {r.name.strip(): r.gib for r in plan.budget}, "vllm": seen}
            if "available_kv_gib" in seen:
                result["kv_error_gib"] = round(kv_row.gib - seen["available_kv_gib"], 3)
            results.append(result)
            print(json.dumps({k: result.get(k) for k in ("model", "card", "predicted_kv_gib", "kv_error_gib")}),
                  flush=True)
    (a.out / "validation.json").write_text(json.dumps(results, indent=2))
    print(f"{'model':34} {'card':6} {'predicted KV':>12} {'vLLM KV':>9} {'error':>7}")
    for r in results:
        seen = r.get("vllm", {})
        print(f"{r['model']:34} {r['card']:6} {r.get('predicted_kv_gib', float('nan')):12.2f} "
              f"{seen.get('available_kv_gib', float('nan')):9.2f} {r.get('kv_error_gib', float('nan')):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
