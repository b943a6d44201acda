"""Where one decode step's time goes, on the GPU: ``python -m bench.profile_step [--model 2b]``.

A random-weight Qwen3-VL of a real size, one slot loaded with the benchmark's prompt, then:
graph replay time per context bucket (batch 1 and 8), the host's share of a step (replays back to
back vs the engine's loop that reads each token), kernel time by kernel (torch profiler over eager
steps), and the pieces in isolation: each projection's GEMV bandwidth (cuBLAS and cuBLASLt) and
attention variants for a one-token query. Prints tables; nothing here is used by the service.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from bench.measure import copy_bandwidth
from bench.workload import Workload, build_inputs, build_model
from bench.hf_prefill import load_prefill, prefill
from service.decode import DecodeRunner, Qwen3VLDecoder, PagedKVCache


def say(message: str) -> None:
    print(f"[profile] {message}", flush=True)


def graph_time(fn, repeats: int = 50) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph (median of ``repeats`` replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_time(graph.replay, repeats)


def replay_time(fn, repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def kernel_table(fn, steps: int = 5, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / steps
            counts[event.name] += 1
    total = sum(totals.values())
    say(f"GPU kernel time per step: {total / 1e3:.3f} ms in {sum(counts.values()) // steps} kernels")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t / 1e3:7.3f} ms {counts[name] // steps:4d}x  {name[:110]}")


def gemv_table(model, bandwidth: float) -> None:
    text = model.model.language_model
    layer = text.layers[0]
    hidden = text.config.hidden_size
    shapes = {
        "qkv": (layer.self_attn.q_proj.out_features + 2 * layer.self_attn.k_proj.out_features, hidden),
        "o_proj": (hidden, layer.self_attn.o_proj.in_features),
        "gate_up": (2 * layer.mlp.gate_proj.out_features, hidden),
        "down": (hidden, layer.mlp.down_proj.in_features),
        "lm_head": tuple(model.get_output_embeddings().weight.shape),
    }
    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        for rows in (1, 8):
            cells = []
            for name, (out_f, in_f) in shapes.items():
                # Several weights in rotation so the 50 MB L2 does not serve repeats.
                weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)

                def run():
                    for w in weights:
                        F.linear(x, w)
                t = graph_time(run) / len(weights)
                gbs = out_f * in_f * 2 / t / 1e9
                cells.append(f"{name} {t * 1e6:6.1f} us {gbs:5.0f} GB/s ({gbs / (bandwidth / 2):.0%})")
                del weights
            say(f"{blas}, {rows} row(s): " + " | ".join(cells))
    torch.backends.cuda.preferred_blas_library("cublas")


def attention_table(layers: int, kv_heads: int, heads: int, dim: int, max_len: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = heads // kv_heads
    for rows, context in ((1, 1024), (1, 2048), (8, 1024)):
        keys = [torch.randn(8, kv_heads, max_len + 1, dim, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        values = [torch.randn_like(k) for k in keys]
        q = torch.randn(rows, kv_heads, groups, dim, device="cuda", dtype=torch.bfloat16)
        lengths = torch.full((rows,), context - 40, device="cuda")
        attend = torch.arange(context, device="cuda")[None] <= lengths[:, None]
        mask = torch.where(attend, 0.0, float("-inf")).to(torch.bfloat16)[:, None, None, :]
        scale = dim ** -0.5

        def sdpa(backend=None):
            def run():
                for k, v in zip(keys, values):
                    if backend is None:
                        F.scaled_dot_product_attention(q, k[:rows, :, :context], v[:rows, :, :context],
                                                       attn_mask=mask, scale=scale)
                    else:
                        with sdpa_kernel([backend]):
                            F.scaled_dot_product_attention(q, k[:rows, :, :context], v[:rows, :, :context],
                                                           attn_mask=mask, scale=scale)
            return run

        def manual():
            for k, v in zip(keys, values):
                scores = torch.matmul(q, k[:rows, :, :context].transpose(-1, -2)).float() * scale + mask
                torch.matmul(scores.softmax(-1).to(q.dtype), v[:rows, :, :context])

        def flash_unmasked():  # the kernel without any mask (wrong for padded rows; a speed reference)
            qf = q.reshape(rows, heads, 1, dim)
            for k, v in zip(keys, values):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    F.scaled_dot_product_attention(qf, k[:rows, :, :context].repeat_interleave(groups, 1),
                                                   v[:rows, :, :context].repeat_interleave(groups, 1), scale=scale)

        cells = []
        for name, fn in (("default", sdpa()), ("efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)),
                         ("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("math", sdpa(SDPBackend.MATH)),
                         ("manual", manual), ("flash no-mask", flash_unmasked)):
            try:
                cells.append(f"{name} {graph_time(fn) * 1e3:.3f} ms")
            except Exception as exc:  # noqa: BLE001 - a backend that refuses this shape
                cells.append(f"{name} n/a ({type(exc).__name__})")
        say(f"attention x{layers} layers, {rows} row(s), context {context}: " + " | ".join(cells))
        del keys, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    parser.add_argument("--model", default="2b")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--compile", default="inductor", help="elementwise compile backend ('' for none)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    bandwidth = copy_bandwidth(device)
    say(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s")
    model, _ = build_model(args.model, "cuda", torch.bfloat16)
    workload = Workload()
    inputs = build_inputs(model, workload, 1)
    cache = PagedKVCache(model.config, 8, args.max_len, dtype=torch.bfloat16, device=device)
    decoder = Qwen3VLDecoder(model, cache, fuse_projections=True, compile_backend=args.compile or None)
    runner = DecodeRunner(decoder)
    text = model.model.language_model.config

    pf = prefill(model, **inputs)
    slot = cache.allocate()
    load_prefill(cache, slot, pf.past_key_values, pf.lengths[0], rope_delta=pf.rope_deltas[0])
    first = pf.logits.argmax(-1)
    del pf
    for _ in range(4):  # compiles outside the capture
        runner.decode([slot], first)
    t = time.perf_counter()
    runner.capture()
    say(f"capture: {time.perf_counter() - t:.1f} s, {len(runner.graphs)} graphs")

    cells = [f"{ctx}: {replay_time(runner.graphs[(1, ctx)].replay) * 1e3:.3f}" for ctx in runner.context_sizes]
    say("graph replay ms, batch 1, by context bucket: " + ", ".join(cells))
    cells = [f"{ctx}: {replay_time(runner.graphs[(8, ctx)].replay) * 1e3:.3f}" for ctx in runner.context_sizes[:5]]
    say("graph replay ms, batch 8, by context bucket: " + ", ".join(cells))

    # The host's share: a decode loop that reads each token (engine style) vs one that never waits.
    def loop(n: int, sync: bool) -> float:
        tokens = first
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            tokens = runner.decode([slot], tokens.tolist() if sync else tokens).argmax(-1)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    for _ in range(2):
        sync_s, async_s = loop(60, True), loop(60, False)
        cache.lengths[slot] -= 120
        cache.lengths_dev[slot] -= 120
    say(f"decode loop per step: host reads each token {sync_s * 1e3:.3f} ms ({1 / sync_s:.0f} tok/s), "
        f"device tokens {async_s * 1e3:.3f} ms ({1 / async_s:.0f} tok/s)")

    ctx = next(c for c in runner.context_sizes if c > cache.lengths[slot])
    runner._inputs[:, 0] = torch.tensor([int(first), cache.lengths[slot], 1, 0])
    length = cache.lengths[slot]

    def eager_step():
        runner._run(1, ctx)
        cache.lengths_dev[slot] = length
    say(f"eager step (no graph): {replay_time(eager_step) * 1e3:.3f} ms")
    kernel_table(eager_step)

    gemv_table(model, bandwidth)
    attention_table(text.num_hidden_layers, text.num_key_value_heads, text.num_attention_heads,
                    decoder.head_dim, args.max_len)

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
