"""`python -m bench --smoke` runs end to end on CPU and writes its one table (the GPU run uses the same code)."""
from __future__ import annotations

from bench.decode_bench import main


def test_bench_smoke_run_writes_one_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["--smoke", "--new-tokens", "4", "--hf-batch", "1", "--out", str(out),
                 "--workdir", str(tmp_path / "work")]) == 0
    table = out.read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for metric in ("roofline decode (bandwidth / bytes per step)", "TTFT, ours (prefill, batch 1)",
                   "decode, ours eager (batch 1)", "decode, transformers generate (batch 1)",
                   "decode, ours fused projections, pipelined (batch 2)"):
        assert metric in rows, metric
    assert "| yes |" in rows["tokens of ours fused projections == ours eager"]
    assert rows["agreement with transformers (float32, greedy)"].count("8 steps, max abs diff") == 1
    # The service's own engine, started in a fresh process with the tiny checkpoint.
    for metric in ("engine: time to ready (process start to warmed up)",
                   "engine, different images, 1 request: TTFT / decode",
                   "engine, different images, 2 concurrent: median TTFT / per-stream decode / aggregate",
                   "engine, the same request, 1 request: TTFT / decode",
                   "engine, the same request, 2 concurrent: median TTFT / per-stream decode / aggregate"):
        assert metric in rows and "failed" not in rows[metric], metric
    assert "engine" not in rows


def test_engine_mode_times_every_concurrent_stream():
    from bench.engine_mode import engine_rows, measure_streams

    started = []

    def open_stream(index):
        started.append(index)
        yield from range(3 + index)  # one item per token

    result = measure_streams(open_stream, 4)
    assert sorted(started) == [0, 1, 2, 3]
    assert [r.tokens for r in result.results] == [3, 4, 5, 6]
    assert all(0 <= r.ttft_s <= r.total_s <= result.wall_s for r in result.results)
    rows = dict(engine_rows(open_stream, (1, 2)))
    assert set(rows) == {"engine, 1 concurrent: median TTFT", "engine, 1 concurrent: decode per stream / aggregate",
                         "engine, 2 concurrent: median TTFT", "engine, 2 concurrent: decode per stream / aggregate"}


def test_bench_smoke_run_on_the_fp8_layout(tmp_path, capsys):
    """`--models tiny-fp8`: the in-process rows on the tiny model quantized to FP8, and the engine on
    a checkpoint in Qwen's FP8 layout (CPU: weights dequantized per call)."""
    out = tmp_path / "bench.md"
    assert main(["--smoke", "--models", "tiny-fp8", "--new-tokens", "4", "--hf-batch", "1", "--batches", "1",
                 "--engine-concurrency", "1", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "| tiny-fp8 |" in out.read_text().splitlines()[2]
    assert "failed" not in rows["decode, ours eager (batch 1)"]
    assert "FP8, CPU: weights dequantized per call" in rows["engine: weights"]
    assert "failed" not in rows["engine, different images, 1 request: TTFT / decode"]
    assert (tmp_path / "work" / "qwen3-vl-tiny-fp8-random" / "config.json").is_file()


def test_the_accuracy_script_on_the_cpu_path_agrees_exactly():
    """On the CPU the FP8 path is the dequantized product itself: every step agrees."""
    import torch

    from bench.fp8_accuracy import accuracy
    from bench.workload import Workload, build_inputs, build_model

    model, _ = build_model("tiny-fp8", "cpu", torch.float32)
    result = accuracy(model, build_inputs(model, Workload(image_width=64, image_height=64), 1), steps=12)
    assert result["agreeing"] == 12 and result["first_difference"] is None
    assert result["max_logit_diff"] < 1e-4 < result["max_logit"]
