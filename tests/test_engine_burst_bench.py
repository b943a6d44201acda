"""bench/engine_burst.py on the CPU: the real engine on the tiny model, its table and the settings it
was given (the torch thread counts are the bench's own; the engine's are restored after)."""
from __future__ import annotations

import re

import torch

from bench import engine_burst


def test_each_concurrency_runs_beforehand_then_per_thread_count_with_its_phase_times(tiny_model_dir, capsys,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    code = engine_burst.main([str(tiny_model_dir), "--concurrency", "2", "--threads", "1,2", "--device", "cpu",
                              "--no-cuda-graphs", "--max-batch-size", "2"])
    assert code == 0 and torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "--max-batch-size 2" in out  # the table names the engine's settings
    rows = re.findall(r"^\| 2 \| (.+?) \| ([0-9]+) \| ([0-9.]+) \| ([0-9]+) / [0-9.]+ \| ([0-9]+) / [0-9.]+ \|$",
                      out, re.M)
    assert [r[0] for r in rows] == ["beforehand", "in its thread, 1 torch thread(s)", "in its thread, 2 torch thread(s)"]
    for _, aggregate, ttft, passes, steps in rows:
        # two requests of 128 tokens in one batch: both prefilled, at least 127 steps of both rows
        assert int(aggregate) > 0 and float(ttft) > 0 and int(passes) >= 1 and int(steps) >= engine_burst.MAX_TOKENS - 1
    assert (tmp_path / "engine_burst.md").read_text() in out
