"""The FP8 path against the bf16 model of the same (dequantized) weights, on the GPU:
``python -m bench.fp8_accuracy [--model 4b] [--steps 128]``.

A random-weight Qwen3-VL of a real size, its decoder linears quantized blockwise to FP8, runs the
benchmark's request (one 1280x704 image + text) through the engine's own prefill (FP8 tensor
cores for the prompt's chunk on 8.9+) and greedy decode steps (the weight-only kernel); then its
FP8 weights are dequantized to bf16 in place and that model is fed the same tokens (teacher
forcing). Reported: at how many of the steps the bf16 model's greedy token is the FP8 model's,
the first step where it is not, and the largest logit difference against the largest logit.
Random weights give flatter logits than trained ones (more near-ties), so agreement here is a
lower bound for a real checkpoint.
"""
from __future__ import annotations

import argparse

import torch

from bench.workload import Workload, build_inputs, build_model
from bench.hf_prefill import prefill_position_ids
from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder, Qwen3VLPrefill
from service.decode.fp8 import decoder_linear_names, dequantize_linears, gemm_for, quantize_linears


@torch.no_grad()
def decode_logits(model, inputs: dict, steps: int, feed: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """The engine's prefill, then ``steps`` decode steps, greedy or fed ``feed``: tokens and the
    float32 logits before each of them ``[steps, vocab]``."""
    ids = inputs["input_ids"][0]
    positions, deltas = prefill_position_ids(model, inputs["input_ids"], inputs["attention_mask"],
                                             inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    dtype = model.get_input_embeddings().weight.dtype
    cache = PagedKVCache(model.config, 1, ids.shape[0] + steps + 1, dtype=dtype, device=ids.device)
    decoder = Qwen3VLDecoder(model, cache, fuse_projections=True)
    runner = DecodeRunner(decoder, batch_sizes=(1,))
    slot = cache.allocate(ids.shape[0] + steps)
    logits = Qwen3VLPrefill(model, decoder).prefill(
        slot, ids.cpu(), positions[1:, 0].cpu(), int(deltas[0]), inputs["pixel_values"],
        inputs["image_grid_thw"].cpu())
    tokens, rows = [], []
    for step in range(steps):
        rows.append(logits.float().clone())
        tokens.append(int(logits.argmax()) if feed is None else feed[step])
        if step + 1 < steps:
            logits = runner.decode([slot], [tokens[-1]])[0]
    return tokens, torch.stack(rows)


def accuracy(model, inputs: dict, steps: int) -> dict:
    """``model`` has FP8 linears; afterwards it holds them dequantized (in its other weights' dtype)."""
    fp8_tokens, fp8_logits = decode_logits(model, inputs, steps)
    dequantize_linears(model, model.get_input_embeddings().weight.dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _, bf16_logits = decode_logits(model, inputs, steps, feed=fp8_tokens)
    same = bf16_logits.argmax(-1).cpu() == torch.tensor(fp8_tokens)
    first = int((~same).nonzero()[0, 0]) if not bool(same.all()) else None
    return {"steps": steps, "agreeing": int(same.sum()), "first_difference": first,
            "max_logit_diff": (fp8_logits - bf16_logits).abs().max().item(),
            "max_logit": bf16_logits.abs().max().item()}


def describe(result: dict) -> str:
    first = "none" if result["first_difference"] is None else f"step {result['first_difference']}"
    return (f"greedy tokens agree at {result['agreeing']}/{result['steps']} steps (first difference: {first}); "
            f"max |logit difference| {result['max_logit_diff']:.3g} (largest |logit| {result['max_logit']:.3g})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="4b", help="2b, 4b or 8b")
    parser.add_argument("--steps", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    model, _ = build_model(args.model, str(device), torch.bfloat16)
    quantize_linears(model, decoder_linear_names(model), gemm_for(device))
    inputs = build_inputs(model, Workload(), 1)
    print(f"{args.model}: {describe(accuracy(model, inputs, args.steps))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
