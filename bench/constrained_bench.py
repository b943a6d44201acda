"""Decode speed with and without a JSON schema: the service's engine (compiled step, CUDA graphs), batch
1 and 8, every row under the grammar or none. One command, a table at the end:

    PYTHONUNBUFFERED=1 python -m bench.constrained_bench          # 2B random weights on the GPU, ~2 min
    python -m bench.constrained_bench --shape tiny --device cpu   # a check that it runs (CPU, seconds)

The model is a random-weight Qwen3-VL of a real size built in memory (nothing downloaded or
written but its config and tokenizer files). Random weights write strings that hardly ever end, so the rows
stay inside the schema's string for the whole answer: `ignore_eos` keeps every row at
--new-tokens, and the table says how many tokens were sampled under the grammar. The target is the
constrained decode within 10% of the unconstrained one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.decode_bench import environment, publish, say, table
from bench.engine_mode import engine_token_stream, measure_streams

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "rating": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["title", "rating", "tags"]}
PROMPT = "Describe the last film you saw as JSON with a title, a rating and tags."


def build_engine(args, workdir: Path):
    from service.engine import Engine
    from service.engine.loading import LoadedModel, load_processor
    from service.engine.startup import configure_torch
    from service.settings import ServiceSettings
    from service.tiny_model import build_config, build_model, build_tokenizer, generation_config, write_processor

    settings = ServiceSettings(model=str(workdir), device=args.device, max_model_len=args.max_model_len,
                               max_batch_size=max(args.batches), memory_budget_gib=args.memory_budget_gib,
                               compile_cache_dir=str(workdir / "compile-cache"), max_images_per_request=1)
    configure_torch(settings)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = build_tokenizer(qwen_ids=args.shape != "tiny")
    model = build_model(build_config(args.shape, tokenizer), dtype=dtype, device=args.device)
    model.generation_config = generation_config(tokenizer)
    write_processor(workdir, tokenizer)
    model.config.save_pretrained(workdir)  # the processor's loader reads the model type from it
    loaded = LoadedModel(model=model, processor=load_processor(workdir), path=workdir, device=device, dtype=dtype)
    started = time.perf_counter()
    engine = Engine(settings, loaded)
    engine.start()
    return engine, time.perf_counter() - started


@contextlib.contextmanager
def mask_timer():
    """Host time spent building each step's token mask (the part a grammar adds on the host)."""
    from service.engine.structured import TokenMask

    seconds: list[float] = []
    original = TokenMask.__dict__["of"]
    build = original.__func__

    def timed(cls, grammars):
        start = time.perf_counter()
        mask = build(cls, grammars)
        if mask is not None:
            seconds.append(time.perf_counter() - start)
        return mask

    TokenMask.of = classmethod(timed)
    try:
        yield seconds
    finally:
        TokenMask.of = original


def run(engine, grammar, batch: int, new_tokens: int) -> dict:
    eos = engine.scheduler._eos_ids
    messages = [{"role": "user", "content": PROMPT}]
    requests = [engine.prepare(messages, [], grammar=grammar, max_tokens=new_tokens, ignore_eos=True, seed=i)
                for i in range(batch)]
    handles: list = []
    result = measure_streams(lambda i: engine_token_stream(engine, requests[i], handles), batch)
    under = sum(next((k for k, t in enumerate(h.token_ids) if t in eos), len(h.token_ids)) for h in handles)
    return {"decode": result.decode_tok_s_per_stream, "aggregate": result.aggregate_tok_s,
            "under_grammar": under / sum(len(h.token_ids) for h in handles),
            "sample": handles[0].token_ids[:48]}


def batch_row(engine, grammar, batch: int, args, masks: list[float]) -> dict[str, str]:
    """The table's column for one batch size: free and constrained runs interleaved (drift affects both)."""
    run(engine, None, batch, 16)  # warm: this batch size's graph, the allocator
    run(engine, grammar, batch, 16)
    points: dict[str, list[dict]] = {"free": [], "json_schema": []}
    mask_times: list[float] = []
    for _ in range(args.repeats):
        points["free"].append(run(engine, None, batch, args.new_tokens))
        masks.clear()
        points["json_schema"].append(run(engine, grammar, batch, args.new_tokens))
        mask_times += masks
    free, constrained = ({m: statistics.median(p[m] for p in points[k]) for m in ("decode", "aggregate", "under_grammar")}
                         for k in ("free", "json_schema"))
    ratio = constrained["decode"] / free["decode"] if free["decode"] else float("nan")
    say(f"batch {batch}: {free['decode']:.0f} vs {constrained['decode']:.0f} tok/s per stream ({ratio:.1%})")
    mask_times.sort()
    return {
        "decode per stream, no constraint": f"{free['decode']:.0f} tok/s",
        "decode per stream, json_schema": f"{constrained['decode']:.0f} tok/s",
        "json_schema / none (target >= 90%)": f"{ratio:.1%}",
        "aggregate, no constraint / json_schema": f"{free['aggregate']:.0f} / {constrained['aggregate']:.0f} tok/s",
        "tokens sampled under the grammar": f"{constrained['under_grammar']:.0%}",
        "mask per step on the host (median / p90)":
            f"{mask_times[len(mask_times) // 2] * 1e6:.0f} / {mask_times[int(len(mask_times) * 0.9)] * 1e6:.0f} us"
            if mask_times else "n/a",
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.constrained_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2b", help="tiny, 2b, 4b or 8b (random weights; default 2b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each point (median)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--memory-budget-gib", type=float, default=12.0)
    parser.add_argument("--workdir", type=Path, default=None, help="tokenizer files and compile cache (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the table here (default: $OUT/constrained_bench.md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from service.engine.structured import Constraint

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlkit-constrained-"))
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    say(environment(device))
    say(f"{args.shape}: building the random-weight model and starting the engine (compile, CUDA graphs)")
    engine, ready_s = build_engine(args, workdir)
    started = time.perf_counter()
    grammar = engine.compile_grammar(Constraint("json", json.dumps(SCHEMA)))
    first_compile = time.perf_counter() - started  # includes the tokenizer's llguidance form, once
    started = time.perf_counter()
    engine.compile_grammar(Constraint("json", json.dumps(SCHEMA)))
    cached = time.perf_counter() - started
    with mask_timer() as masks:
        rows = {f"batch {batch}": batch_row(engine, grammar, batch, args, masks) for batch in args.batches}
    rows[f"batch {args.batches[0]}"].update({
        "engine start (compile, graphs, warm-up)": f"{ready_s:.1f} s",
        "schema compile: first (with the tokenizer) / cached": f"{first_compile * 1e3:.0f} / {cached * 1e3:.2f} ms",
        "sample answer (first tokens)": repr(engine.tokenizer.decode(run(engine, grammar, 1, 48)["sample"]))[:80],
    })
    engine.stop()
    publish(f"Constrained decoding benchmark ({environment(device)}; {args.shape} random weights, "
            f"{args.new_tokens} new tokens, median of {args.repeats})\n\n{table(rows)}\n", args.out,
            "constrained_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
