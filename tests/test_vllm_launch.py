"""The vLLM launcher and the calibration tool, driven through a stand-in for `vllm serve`
(tests/vllm_standin.py: a real process group with an engine-core child, a real HTTP port, vLLM's
log lines from tests/data/vllm/). The GPU-side part, vLLM itself, runs on the device only."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from scripts.planner.vllm_launch import VllmStartError, free_port, parse_log, vllm_server

DATA = Path(__file__).parent / "data" / "vllm"
STANDIN = Path(__file__).parent / "vllm_standin.py"


def _command(mode: str, log: str = "kv-0.24.log", record: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(STANDIN), "--log", str(DATA / log), "--mode", mode]
    return cmd + (["--record", str(record)] if record else []) + ["--"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_parse_log_reads_vllms_figures():
    """vLLM 0.24.0's own logs from the device (tests/data/vllm/README.md): 4B-FP8 eager on an
    emulated 8 GiB card, and the seeds' command, which ends in vLLM's error."""
    figures = parse_log((DATA / "kv-0.24.log").read_text())
    assert figures["available_kv_gib"] == 0.79 and figures["kv_tokens"] == 11504
    assert figures["weights_gib"] == 5.22 and figures["non_kv_gib"] == 5.69
    assert figures["torch_peak_increase_gib"] == 0.24 and figures["non_torch_increase_gib"] == 0.22
    assert figures["encoder_budget_tokens"] == 2048 and figures["profiled_items"] == 2
    assert "cuda_graph_estimate_gib" not in figures                      # --enforce-eager: no graphs
    assert figures["vllm_version"] == "0.24.0" and figures["error"] is None and not figures["v2_runner"]
    failed = parse_log((DATA / "fail-0.24.log").read_text())
    assert failed["available_kv_gib"] == -1.41 and "No available memory for the cache blocks" in failed["error"]
    assert failed["cuda_graph_estimate_gib"] == 0.39 and failed["vllm_version"] == "0.24.0"
    assert failed["cuda_graph_modes"] == {"PIECEWISE": {"first_mib": 88.0, "graphs": 51, "per_graph_mib": 4.0},
                                          "FULL": {"first_mib": 130.0, "graphs": 35, "per_graph_mib": 2.0}}


def test_waits_for_the_kv_line_then_stops_the_whole_group(tmp_path):
    record, port = tmp_path / "record.jsonl", free_port()
    with vllm_server(tmp_path / "model", ["--max-model-len", "13568"], port=port, log_path=tmp_path / "a.log",
                     wait="kv", command=_command("serve", record=record), timeout_s=30) as server:
        assert server.figures()["available_kv_gib"] == 0.79
        child = json.loads(record.read_text())["child"]
        assert _alive(child)
        argv = json.loads(record.read_text())["argv"]
    assert argv[:5] == [str(tmp_path / "model"), "--host", "127.0.0.1", "--port", str(port)]
    assert argv[5:] == ["--max-model-len", "13568"]
    assert not _alive(server.process.pid) and not _alive(child)


def test_waits_for_health_and_serves_on_its_port(tmp_path):
    port = free_port()
    with vllm_server(tmp_path, [], port=port, log_path=tmp_path / "b.log", command=_command("serve"),
                     timeout_s=30) as server:
        assert server.healthy() and server.url == f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 5
    while not _port_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _port_free(port)                    # the next case may take it


def test_health_is_asked_of_127_0_0_1_past_a_proxy_in_the_environment(tmp_path, monkeypatch):
    """A shell with HTTP_PROXY set (a GPU box behind a corporate proxy): urllib sent the launcher's
    /health polls to that proxy, here a port nothing listens on, and the start timed out."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with vllm_server(tmp_path, [], port=free_port(), log_path=tmp_path / "p.log", command=_command("serve"),
                     timeout_s=15) as server:
        assert server.healthy()


def test_a_failed_start_is_an_error_with_vllms_reason_or_data(tmp_path):
    with pytest.raises(VllmStartError, match="exited before kv .*No available memory for the cache blocks"):
        with vllm_server(tmp_path, [], port=free_port(), log_path=tmp_path / "c.log", wait="kv",
                         command=_command("fail", "fail-0.24.log"), timeout_s=30):
            pass
    with vllm_server(tmp_path, [], port=free_port(), log_path=tmp_path / "d.log", wait=None,
                     command=_command("fail", "fail-0.24.log")) as server:
        assert server.wait("kv", 30) == "exited"
        assert server.figures()["available_kv_gib"] == -1.41


def test_a_group_that_ignores_sigterm_is_killed(tmp_path):
    record = tmp_path / "record.jsonl"
    with vllm_server(tmp_path, [], port=free_port(), log_path=tmp_path / "e.log", wait="kv", timeout_s=30,
                     command=_command("stubborn", record=record), stop_grace_s=1) as server:
        child = json.loads(record.read_text())["child"]
    assert not _alive(server.process.pid) and not _alive(child)


def test_a_hung_start_times_out(tmp_path):
    started = time.monotonic()
    with vllm_server(tmp_path, [], port=free_port(), log_path=tmp_path / "f.log", wait=None,
                     command=_command("silent"), stop_grace_s=1) as server:
        assert server.wait("kv", 1.5) == "timeout"
    assert time.monotonic() - started < 10 and not _alive(server.process.pid)


# ------------------------------------------------------------------------- the calibration tool
def test_the_checkpoint_is_one_vllm_serves_as_a_generative_qwen3_vl(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from scripts.planner.models import fp8_modules_not_converted, resolve_model
    from scripts.planner.validate_on_gpu import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "fp8", "Qwen/Qwen3-VL-4B-Instruct-FP8")
    config = AutoConfig.from_pretrained(ckpt)
    assert config.architectures == ["Qwen3VLForConditionalGeneration"]     # else vLLM 0.24: a pooling model
    q = config.quantization_config
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]
    spec = resolve_model(str(ckpt))
    assert q["modules_to_not_convert"] == fp8_modules_not_converted(spec.vision) and not spec.vision_quantized
    assert spec.text == resolve_model("Qwen/Qwen3-VL-4B-Instruct-FP8").text
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655 == config.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert (ckpt / "preprocessor_config.json").is_file() and not list(ckpt.glob("*.safetensors"))


def test_calibration_runs_the_cases_one_port_each_and_writes_the_table(tmp_path, capsys):
    """Cases through the stand-in (its log stands for vLLM's): the planned flags rescaled to the big GPU,
    --load-format dummy --runner generate, one port each; a case whose expected time would overrun
    --budget-s is skipped, not started."""
    from scripts.planner import plan_for
    from scripts.planner.validate_on_gpu import main

    record = tmp_path / "record.jsonl"
    command = " ".join(_command("serve", record=record))
    rc = main(["--out", str(tmp_path / "out"), "--case", "8GiB-2B", "--case", "8GiB-4B-FP8", "--case", "24GiB-8B",
               "--gpu-total", "140GiB", "--vllm-command", command, "--budget-s", "110"])  # ~100 + ~100 + ~120 s
    assert rc == 0
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    ports = [r["argv"][r["argv"].index("--port") + 1] for r in runs]
    assert len(runs) == 2 and len(set(ports)) == 2                        # the 24 GiB case was skipped
    planned = plan_for(model="Qwen/Qwen3-VL-2B-Instruct", profile="16gb", gpu_memory_bytes=8 * 1024**3).vllm_args
    argv = runs[0]["argv"]
    util = float(argv[argv.index("--gpu-memory-utilization") + 1])
    assert util == pytest.approx(float(planned[1]) * 8 / 140, rel=1e-5)
    assert argv[argv.index("--max-num-seqs") + 1] == planned[planned.index("--max-num-seqs") + 1]
    assert argv[-4:] == ["--load-format", "dummy", "--runner", "generate"]
    doc = json.loads((tmp_path / "out" / "calibration.json").read_text())
    outcomes = {c["case"]: c["outcome"] for c in doc["cases"]}
    assert outcomes == {"8GiB-2B": "kv", "8GiB-4B-FP8": "kv", "24GiB-8B": "skipped"}
    first = doc["cases"][0]
    assert first["vllm"]["available_kv_gib"] == 0.79 and first["error_gib"] == pytest.approx(
        first["predicted"]["kv_gib"] - 0.79, abs=1e-3)
    out = capsys.readouterr().out
    assert "8GiB-2B" in out and "planned KV" in out and "skipped" in out


def test_calibration_without_cases_for_that_many_gpus_is_a_usage_error(tmp_path, capsys):
    from scripts.planner.validate_on_gpu import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "out"), "--gpus", "3", "--gpu-total", "140GiB"])
    assert exit_.value.code == 2 and "no cases for --gpus 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()                        # nothing started, nothing written
