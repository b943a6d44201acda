"""Where a prefill's time goes, on the GPU: ``python -m bench.profile_prefill [--model 2b]``.

The benchmark's request (one 1280x704 image + text, random-weight Qwen3-VL of a real size), prefilled
two ways: transformers' forward (last-position logits, DynamicCache), and the engine's own prefill
(``service.decode.Qwen3VLPrefill``: the images through the vision tower in one forward, the text in
passes, K/V straight into a slot of the paged cache). For each: wall time, the host's time to launch it (no sync), and the vision
tower's share; then the operators that take the most host and device time in ours (torch
profiler), and the peak memory of both. Prints tables; nothing here is used by the service.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.hf_prefill import prefill_position_ids
from bench.workload import Workload, build_inputs, build_model
from service.decode import PagedKVCache, Qwen3VLDecoder, Qwen3VLPrefill
from service.decode.qwen3_prefill import split_images
from service.decode.qwen3_step import fuse_linears, text_model_of

GIB = 1024**3


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds of ``fn`` (synchronised), and of launching it (host returns, no sync)."""
    walls, launches = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        launches.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), statistics.median(launches)


def peak_of(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_prefill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="2b")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model, _ = build_model(args.model, "cuda", torch.bfloat16)
    for layer in text_model_of(model).layers:  # as the engine does on CUDA
        fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
        fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])
    inputs = build_inputs(model, Workload(), 1)
    ids = inputs["input_ids"][0].cpu()
    grid = inputs["image_grid_thw"].cpu()
    positions, deltas = prefill_position_ids(model, inputs["input_ids"], inputs["attention_mask"],
                                             inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    mrope, delta = positions[1:, 0].cpu(), int(deltas[0])
    cache = PagedKVCache(model.config, 1, 2048, dtype=torch.bfloat16, device="cuda")
    # As the engine runs it on CUDA: the vision tower's rotary compiled, the pixels from the host in
    # the tower's dtype (prepared so in the request's thread), through its pinned staging buffer.
    torch.backends.cuda.enable_cudnn_sdp(False)
    ours = Qwen3VLPrefill(model, Qwen3VLDecoder(model, cache, fuse_projections=True), compile_backend="inductor")
    host_pixels = inputs["pixel_values"].to("cpu", torch.bfloat16)

    def transformers_forward():
        return model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)

    def our_prefill():
        slot = cache.allocate(len(ids) + 128)
        try:
            return ours.prefill(slot, ids, mrope, delta, host_pixels, grid)
        finally:
            cache.free(slot)

    images = split_images(host_pixels, grid)

    def vision():
        return ours.vision.encode(images)

    def four_alone():  # a wave of four same-size image requests, each image its own forward
        for _ in range(4):
            ours.vision.encode(images[:1])

    def four_together():  # the same four in one forward (the engine batches a pass's images)
        return ours.vision.encode(images[:1] * 4)

    for _ in range(3):
        transformers_forward()
        our_prefill()
    rows = [("prompt tokens / image patches", f"{len(ids)} / {inputs['pixel_values'].shape[0]}")]
    for name, fn in (("transformers forward", transformers_forward), ("ours (Qwen3VLPrefill)", our_prefill),
                     ("vision tower alone", vision), ("vision tower, 4 images one forward each", four_alone),
                     ("vision tower, the 4 images in one forward", four_together)):
        wall, launch = timed(fn, args.repeats)
        rows.append((f"{name}: wall / host launch", f"{wall * 1000:.1f} / {launch * 1000:.1f} ms"))
    rows.append(("peak allocated: transformers / ours", f"{peak_of(transformers_forward):.3f} / "
                                                         f"{peak_of(our_prefill):.3f} GiB"))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        our_prefill()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    waits = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    rows.append(("ours: kernel launches / host syncs", f"{launches} / {waits}"))
    print("\n| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\nOurs, top operators by host time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    print("\nOurs, top operators by device time:")
    print(events.table(sort_by="self_device_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
