"""bench/versus_vllm.py on the CPU, our side only (no vLLM, no GPU here): the real server on
127.0.0.1 with the tiny model, driven by the openai SDK through the bench's own loop."""
from __future__ import annotations

import re

from bench import versus_vllm


def test_our_side_runs_each_burst_repeats_times_with_the_settings_given_over_the_plans(tmp_path, capsys):
    code = versus_vllm.main(["--shape", "tiny", "--cards", "8GiB", "--concurrency", "1,2", "--max-tokens", "3",
                             "--only", "vlkit", "--repeats", "2", "--workdir", str(tmp_path),
                             "--vlkit-env", "VLKIT_MAX_MODEL_LEN=2048", "--vlkit-env", "OMP_NUM_THREADS=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "every figure the median of 2 bursts" in out
    assert "VLKIT_MAX_MODEL_LEN=2048" in out and "OMP_NUM_THREADS=1" in out  # the report names what ran
    for n in (1, 2):
        row = re.search(rf"\| 8GiB, {n} concurrent: aggregate \(tok/s\) \| ([0-9.]+) \| nan \|", out)
        assert row and float(row.group(1)) > 0
    log = (tmp_path / "vlkit-8GiB.log").read_text()
    assert "(max context 2048)" in log  # the override reached the server, over the plan's 4096
    assert log.count('"POST /v1/chat/completions HTTP/1.1" 200') == 1 + 2 * (1 + 2)  # warm-up + repeats x bursts


def test_a_setting_without_a_value_is_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        versus_vllm.main(["--shape", "tiny", "--only", "vlkit", "--workdir", str(tmp_path), "--vlkit-env", "OMP"])
    assert "KEY=VALUE" in capsys.readouterr().err
