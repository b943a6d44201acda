"""The planner against real vLLM on a big GPU: emulated smaller cards, vLLM's KV cache against the plan.

Runs on a CUDA machine with vLLM importable (docs/PLANNER.md "Calibration" has the device calls);
nothing of the host CLI imports it. In one command of under 9 minutes (--budget-s):

    python3 -m scripts.planner.validate_on_gpu --out $OUT/calibration              # the default cases
    python3 -m scripts.planner.validate_on_gpu --out DIR --case 8GiB-2B --case seeds
    python3 -m scripts.planner.validate_on_gpu --out DIR --gpus 2                  # tensor parallel cases

For each case it writes (once per model) an offline checkpoint vLLM accepts with dummy weights:
config.json with architectures = Qwen3VLForConditionalGeneration (else vLLM 0.24 serves a pooling
model), Qwen's -FP8 quantization_config where FP8, a tokenizer whose special tokens sit at Qwen's
ids, Qwen3-VL's processor files. It asks the planner for the card, rescales
--gpu-memory-utilization so vLLM requests the emulated card's bytes of this GPU, starts `vllm serve
--load-format dummy --runner generate` (vllm_launch.py, one port per case), stops it as soon as vLLM
has logged its KV cache size (no graph capture, no API server: that is what makes the run fit), and
compares. It prints the table and writes calibration.json (+ each case's log) to --out.
What the emulation cannot reproduce: a desktop's memory and a consumer card's CUDA context (the
free-memory start-up check), and a consumer GPU's kernels and workspaces.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scripts.planner.sizes import memory_arg
from scripts.planner.vllm_launch import VLLM_COMMAND

GIB = 1024**3
# The GPU machine's vLLM runs without flashinfer (not carried) and without DeepGEMM's ~15 min warm-up
# of FP8 shapes on Hopper (consumer cards never use it); offline; every profiling line (DEBUG).
DEVICE_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_DEEP_GEMM": "0", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "DEBUG", "TOKENIZERS_PARALLELISM": "false"}
# Several GPUs: NVLink multicast stays off (the device's KINDS.md), so does vLLM's symmetric-memory
# all-reduce, which would use it.
MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                 "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
RUNNER_ENV = {"default": {}, "v1": {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "v2": {"VLLM_USE_V2_MODEL_RUNNER": "1"}}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    card_gib: int
    gpus: int = 1
    args: tuple[str, ...] = ()          # a hand-written command instead of the plan (vLLM's defaults for the rest)
    # Expected to the KV line. Measured 2026-12-01 (vLLM 0.24, H200): 98.6 s for 8GiB-4B-FP8 (eager: the
    # API server's start, not the compile, takes most of it), 114 s for seeds (graphs), 98 s and 74 s
    # (compile cache warm) for 2B with graphs (bench.versus_vllm's logs); the 8B and tensor parallel
    # cases are not measured: 20 s more.
    seconds: int = 100
    why: str = ""


# Best first: a run that runs out of --budget-s drops the last ones.
CASES: tuple[Case, ...] = (
    Case("8GiB-2B", "Qwen/Qwen3-VL-2B-Instruct", 8, why="the thinnest margin: the seeds' card, graphs"),
    Case("8GiB-4B-FP8", "Qwen/Qwen3-VL-4B-Instruct-FP8", 8,
         why="Qwen's FP8 layout (vision tower bf16), fp8 KV cache, eager"),
    Case("16GiB-2B", "Qwen/Qwen3-VL-2B-Instruct", 16, why="the batch rule's cost: 48 sequences, 4096 tokens"),
    Case("seeds", "Qwen/Qwen3-VL-4B-Instruct-FP8", 8, seconds=115,
         args=("--gpu-memory-utilization", "0.80", "--max-model-len", "4096", "--max-num-seqs", "256",
               "--max-num-batched-tokens", "2048"),
         why="the user's command: one 16,384-token dummy image, 256 sequences' graphs"),
    Case("16GiB-8B-FP8", "Qwen/Qwen3-VL-8B-Instruct-FP8", 16, seconds=120, why="the 8B tower, untied lm_head"),
    Case("12GiB-4B", "Qwen/Qwen3-VL-4B-Instruct", 12, why="fp8 KV cache with graphs"),
    Case("24GiB-2B", "Qwen/Qwen3-VL-2B-Instruct", 24, why="the largest batch: 8192 tokens, 8 dummy images"),
    Case("24GiB-8B", "Qwen/Qwen3-VL-8B-Instruct", 24, seconds=120, why="bf16 8B"),
    Case("16GiB-4B", "Qwen/Qwen3-VL-4B-Instruct", 16, why="bf16 4B"),
)
TP_CASES: tuple[Case, ...] = (
    Case("2x16GiB-8B", "Qwen/Qwen3-VL-8B-Instruct", 16, gpus=2, seconds=130, why="issue 17: bf16 8B over two cards"),
    Case("2x16GiB-8B-FP8", "Qwen/Qwen3-VL-8B-Instruct-FP8", 16, gpus=2, seconds=130, why="issue 17: FP8 8B"),
    Case("2x8GiB-4B", "Qwen/Qwen3-VL-4B-Instruct", 8, gpus=2, seconds=120, why="issue 17: 4B over two 8 GiB cards"),
)


@dataclass
class Result:
    case: str
    model: str
    card_gib: int
    gpus: int
    outcome: str                        # kv | exited | timeout | skipped | refused (the plan does not fit)
    args: list[str] = field(default_factory=list)
    predicted: dict = field(default_factory=dict)
    vllm: dict = field(default_factory=dict)

    @property
    def error_gib(self) -> float | None:
        if "available_kv_gib" in self.vllm and "kv_gib" in self.predicted:
            return round(self.predicted["kv_gib"] - self.vllm["available_kv_gib"], 3)
        return None


def write_checkpoint(out: Path, model: str) -> Path:
    """config + tokenizer + processor of the real architecture, no weights (--load-format dummy)."""
    from scripts.planner import resolve_model
    from scripts.planner.models import fp8_modules_not_converted
    from service.tiny_model import build_config, build_tokenizer, write_processor

    spec = resolve_model(model)
    size = next(s for s in ("2b", "4b", "8b") if f"-{s.upper()}-" in model)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(qwen_ids=True)
    config = build_config(size, tok)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    if spec.fp8_checkpoint:   # Qwen's -FP8 layout: block-wise fp8 linears, lm_head and the vision tower in bf16
        config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128],
                                      "modules_to_not_convert": fp8_modules_not_converted(spec.vision)}
    config.save_pretrained(out)
    write_processor(out, tok)
    return out


def emulate(args: list[str], card_bytes: int, total: int) -> list[str]:
    """The same --gpu-memory-utilization bytes of this GPU as of the emulated card."""
    i = args.index("--gpu-memory-utilization")
    return [*args[:i + 1], f"{float(args[i + 1]) * card_bytes / total:.6f}", *args[i + 2:]]


def predict_case(case: Case) -> tuple[list[str], dict] | str:
    """(the command's flags, the planner's figures), or the plan's refusal."""
    from scripts.planner import plan_for, resolve_model
    from scripts.planner.card import card_for
    from scripts.planner.vllm_memory import predict
    from scripts.planner.vllm_plan import knobs_from_args, margin

    spec = resolve_model(case.model)
    card = card_for(None, case.card_gib * GIB, case.gpus)
    if case.args:
        args = list(case.args) + (["--tensor-parallel-size", str(case.gpus)] if case.gpus > 1 else [])
    else:
        plan = plan_for(model=case.model, profile="16gb", gpu_memory_bytes=card.total, gpu_count=case.gpus)
        if not plan.fits:
            return plan.refusal or "does not fit"
        args = plan.vllm_args
    b = predict(spec, knobs_from_args(args, spec), total=card.total, free=card.free)
    g = lambda n: round(n / GIB, 3)  # noqa: E731
    return args, {"kv_gib": g(b.kv_available), "kv_tokens": b.kv_tokens, "margin_gib": g(margin(b)),
                  "weights_gib": g(b.weights), "activations_gib": g(b.activations), "non_torch_gib": g(b.non_torch),
                  "cuda_graphs_gib": g(b.cuda_graphs), "profiled_images": b.profiled_images}


def run_case(case: Case, ckpt: Path, out: Path, total: int, timeout_s: float, env: dict[str, str],
             command: list[str]) -> Result:
    from scripts.planner.vllm_launch import free_port, vllm_server

    predicted = predict_case(case)
    if isinstance(predicted, str):
        return Result(case.name, case.model, case.card_gib, case.gpus, "refused", vllm={"error": predicted})
    args, figures = predicted
    run_args = [*emulate(args, case.card_gib * GIB, total), "--load-format", "dummy", "--runner", "generate"]
    with vllm_server(ckpt, run_args, port=free_port(), log_path=out / f"vllm-{case.name}.log", env=env,
                     wait=None, command=command) as server:
        outcome = server.wait("kv", timeout_s)
        seen = server.figures()
    return Result(case.name, case.model, case.card_gib, case.gpus, outcome, run_args, figures, seen)


def gpu_free_bytes() -> tuple[int, int] | None:
    """(free, total) of GPU 0 as CUDA reports them; None without torch or CUDA (a dry run elsewhere)."""
    try:
        import torch
        return torch.cuda.mem_get_info() if torch.cuda.is_available() else None
    except ImportError:
        return None


def wait_gpu_released(baseline_free: int | None, timeout_s: float = 30) -> None:
    """Until the last server's memory is back: vLLM asserts that no other process frees memory while
    it profiles, so the next case must not start while the last one's teardown still releases it."""
    deadline = time.monotonic() + timeout_s
    while baseline_free is not None and time.monotonic() < deadline:
        now = gpu_free_bytes()
        if now is None or now[0] >= baseline_free - 256 * 1024**2:
            return
        time.sleep(0.5)


def table(results: list[Result]) -> str:
    head = (f"{'case':16} {'planned KV':>10} {'vLLM KV':>8} {'error':>14} {'margin':>6} {'weights p/v':>11} "
            f"{'act.peak':>8} {'non-torch':>9} {'graphs p/v':>11} {'s':>4}  error line")
    rows = [head, "-" * len(head)]
    for r in results:
        p, v = r.predicted, r.vllm
        err = r.error_gib
        pct = f"{err:+.2f} ({100 * err / max(abs(v['available_kv_gib']), 0.01):+.0f}%)" if err is not None else "-"
        num = lambda d, k: f"{d[k]:.2f}" if isinstance(d.get(k), (int, float)) else "-"  # noqa: E731
        rows.append(f"{r.case:16} {num(p, 'kv_gib'):>10} {num(v, 'available_kv_gib'):>8} {pct:>14} "
                    f"{num(p, 'margin_gib'):>6} {num(p, 'weights_gib') + '/' + num(v, 'weights_gib'):>11} "
                    f"{num(v, 'torch_peak_increase_gib'):>8} {num(v, 'non_torch_increase_gib'):>9} "
                    f"{num(p, 'cuda_graphs_gib') + '/' + num(v, 'cuda_graph_estimate_gib'):>11} "
                    f"{v.get('seconds', '-'):>4}  {r.outcome}: {v.get('error') or ''}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--case", action="append", help="by name (default: every case for --gpus, best first)")
    p.add_argument("--gpus", type=int, default=1, help="1: one emulated card; 2+: the tensor parallel cases")
    p.add_argument("--runner", choices=tuple(RUNNER_ENV), default="default",
                   help="vLLM's model runner (VLLM_USE_V2_MODEL_RUNNER): what the pinned version runs on WSL2 is v1")
    p.add_argument("--budget-s", type=float, default=510, help="start no case that would end after this")
    p.add_argument("--case-timeout-s", type=float, default=200)
    p.add_argument("--vllm-command", help="how to run `vllm serve` (default: this Python's vllm module)")
    p.add_argument("--gpu-total", type=memory_arg, metavar="SIZE", help="this GPU's memory (default: what CUDA reports)")
    a = p.parse_args(argv)
    pool = CASES if a.gpus == 1 else tuple(c for c in TP_CASES if c.gpus == a.gpus)
    known = {c.name: c for c in CASES + TP_CASES}
    unknown = [n for n in a.case or [] if n not in known]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    cases = [known[n] for n in a.case] if a.case else list(pool)
    if not cases:
        p.error(f"no cases for --gpus {a.gpus}; there are for {', '.join(sorted({str(c.gpus) for c in known.values()}))}")
    env = {**DEVICE_ENV, **RUNNER_ENV[a.runner], **(MULTI_GPU_ENV if max(c.gpus for c in cases) > 1 else {})}
    a.out.mkdir(parents=True, exist_ok=True)
    command = shlex.split(a.vllm_command) if a.vllm_command else list(VLLM_COMMAND)
    cuda = gpu_free_bytes()
    if a.gpu_total is None and cuda is None:
        p.error("no CUDA GPU seen through torch: give its memory with --gpu-total")
    started, total, results = time.monotonic(), a.gpu_total or cuda[1], []
    baseline_free = cuda[0] if cuda else None
    checkpoints: dict[str, Path] = {}
    for case in cases:
        left = a.budget_s - (time.monotonic() - started)
        if left < case.seconds:
            results.append(Result(case.name, case.model, case.card_gib, case.gpus, "skipped",
                                  vllm={"error": f"{left:.0f} s of --budget-s left, the case takes ~{case.seconds} s"}))
        else:
            if case.model not in checkpoints:
                checkpoints[case.model] = write_checkpoint(a.out / "ckpt" / case.model.split("/")[-1], case.model)
            results.append(run_case(case, checkpoints[case.model], a.out, total, min(a.case_timeout_s, left), env,
                                    command))
            wait_gpu_released(baseline_free)
        print(f"{case.name}: {results[-1].outcome} after {results[-1].vllm.get('seconds', 0)} s", flush=True)
        _write(a.out, results, total, a.runner)   # after every case: a cut-off run keeps what it measured
    print(table(results))
    return 0


def _write(out: Path, results: list[Result], total: int, runner: str) -> None:
    from scripts.images import VLLM_VERSION

    doc = {"gpu_total_bytes": total, "runner": runner, "planner_models_vllm": VLLM_VERSION,
           "cases": [{**asdict(r), "error_gib": r.error_gib} for r in results]}
    (out / "calibration.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    sys.exit(main())
