"""`python -m bench.constrained_bench` runs end to end on CPU with the tiny shape and prints its table
(the H200 run is the same code with the 2B shape)."""
from __future__ import annotations

from bench.constrained_bench import main


def test_constrained_bench_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "constrained.md"
    assert main(["--shape", "tiny", "--device", "cpu", "--batches", "1,2", "--new-tokens", "8", "--repeats", "1",
                 "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    table = out.read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["metric"].endswith("| batch 1 | batch 2 |")
    for metric in ("decode per stream, no constraint", "decode per stream, json_schema",
                   "json_schema / none (target >= 90%)", "mask per step on the host (median / p90)"):
        assert metric in rows and "nan" not in rows[metric], metric
    assert rows["tokens sampled under the grammar"].count("100%") == 2
    assert rows["sample answer (first tokens)"].startswith("| sample answer (first tokens) | '{")
