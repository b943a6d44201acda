"""wsl/health.py: the gate `make up` runs first, fed with the H100's real `nvidia-smi -q`."""
from __future__ import annotations

import os
import re

from tests.doctor_helpers import H100, PUBLIC, h100_smi, parser, read
from wsl import health

GIB = 1024 ** 3
Q = read(H100 / "nvidia-smi-q.txt")


def _volatile_dram_uncorrectable(text: str, n: int) -> str:
    """The real H100 text with its first (Volatile) DRAM Uncorrectable counter set to n."""
    return re.sub(r"(DRAM Uncorrectable\s+: )0", rf"\g<1>{n}", text, count=1)


def test_memory_errors_of_a_healthy_h100():
    for text in (Q, read(H100 / "nvidia-smi-q-ecc.txt")):
        [err] = health.parse_memory_errors(text)
        assert err == health.MemoryErrors()


def test_fb_memory():
    assert health.parse_fb_memory(Q) == [(81559 * 1024 ** 2, 81079 * 1024 ** 2)]


def test_gate_passes_with_room_and_refuses_without():
    ok = health.evaluate(Q, required_free_bytes=10 * GIB)
    assert ok.ok and ok.reasons == [] and ok.free_bytes == 81079 * 1024 ** 2
    short = health.evaluate(Q, required_free_bytes=100 * GIB)
    assert not short.ok
    assert "79.18 GiB VRAM free, the plan needs 100.00 GiB" in short.reasons[0]
    assert "vlkit plan" in short.fixes[0]
    assert health.evaluate(Q, required_free_bytes=None).ok  # no plan: VRAM not judged


def test_gate_refuses_live_uncorrectable_ecc_but_not_lifetime_only():
    live = _volatile_dram_uncorrectable(Q, 3)
    [err] = health.parse_memory_errors(live)
    assert err.volatile_uncorrectable == 3 and err.aggregate_uncorrectable == 0
    result = health.evaluate(live, 1 * GIB)
    assert not result.ok and "3 uncorrectable ECC error(s)" in result.reasons[0]
    assert "nvidia-smi -r" in result.fixes[0]


def test_gate_refuses_pending_row_remap():
    pending = re.sub(r"(Remapped Rows\n(?:.*\n)*?\s+Pending\s+: )No", r"\g<1>Yes", Q, count=1)
    assert pending != Q
    result = health.evaluate(pending, 1 * GIB)
    assert not result.ok and "waiting to be retired" in result.reasons[0]


def test_xid_lines_from_real_kernel_logs():
    assert health.parse_xids(read(PUBLIC / "dmesg-xid79.txt")) == [("PCI:0000:44:00", 79)]
    # newer drivers: several lines, no Xid number
    assert health.parse_xids(read(PUBLIC / "dmesg-fallen-off-bus-no-xid.txt")) == [("0000:b3:00.0", 79)]
    result = health.evaluate(Q, 1 * GIB, read(PUBLIC / "dmesg-xid79.txt"))
    assert not result.ok
    assert result.reasons == ["kernel log: Xid 79 on PCI:0000:44:00 (GPU has fallen off the bus)"]
    assert "reboot" in result.fixes[0]


def test_application_xids_do_not_block():
    # Xid 13/31 are a program's faults (same line format as the real Xid 79 line above)
    result = health.evaluate(Q, 1 * GIB, "NVRM: Xid (PCI:0000:44:00): 13, pid=1234, name=python3\n")
    assert result.ok


def test_gate_without_driver(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("scripts.gpu.WSL_LIB_DIR", str(tmp_path / "nowhere"))
    result = health.gate(1 * GIB)
    assert not result.ok and "nvidia-smi not found" in result.reasons[0]
    assert "ubuntu-drivers" in result.fixes[0]  # this machine is native Linux


def test_gate_runs_nvidia_smi(monkeypatch, tmp_path):
    h100_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert health.gate(10 * GIB).ok
    assert not health.gate(90 * GIB).ok


def test_health_command_exit_codes(monkeypatch, tmp_path, capsys):
    from scripts.doctor import cli
    h100_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(cli, "required_free_bytes", lambda profile, model: (90 * GIB, None))
    args = parser().parse_args(["health", "--profile", "16gb", "--json"])
    assert args.func(args) == 1
    assert '"ok": false' in capsys.readouterr().out
    monkeypatch.setattr(cli, "required_free_bytes", lambda profile, model: (8 * GIB, None))
    args = parser().parse_args(["health", "--profile", "8gb"])
    assert args.func(args) == 0
    assert "GPU healthy" in capsys.readouterr().out
