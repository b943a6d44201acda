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
