"""wsl/restart.py: explain, list GPU consumers, confirm, then `wsl.exe --shutdown` (or print it)."""
from __future__ import annotations

import io
import os

from scripts import gpu
from tests.doctor_helpers import PUBLIC, read
from wsl import restart as restart_mod
from wsl.host import Platform

WSL2 = Platform("wsl2", "5.15.167.4-microsoft-standard-WSL2", "")
LINUX = Platform("linux", "6.8.0", "")


class Tty(io.StringIO):
    def isatty(self):
        return True


def k80_gpus():
    """A GPU with the real process row of a recorded nvidia-smi table."""
    [(index, proc)] = gpu.parse_smi_processes(read(PUBLIC / "linux-k80-driver390-nvidia-smi.txt"))
    info = gpu.GpuInfo(index, "Tesla K80", None, 11441 * 2 ** 20, 991 * 2 ** 20, 10450 * 2 ** 20, "390.30", None, None, [proc])
    return [info, gpu.GpuInfo(1, "WSL GPU", None, 8 * 2 ** 30, 6 * 2 ** 30, 2 * 2 ** 30, "526.98", "12.0", None,
                              [gpu.GpuProcess(41, "/Xwayland", None)])]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        import subprocess
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_consumers_listed_biggest_first_unknown_sizes_said():
    lines = restart_mod.describe_consumers(k80_gpus())
    assert lines == ["GPU 0: pid 3701 python (10436 MiB)", "GPU 1: pid 41 /Xwayland (size not reported under WSL)"]


def test_not_wsl_prints_the_powershell_command():
    out, run = io.StringIO(), Recorder()
    assert restart_mod.restart(platform=LINUX, gpus=k80_gpus(), stdout=out, run=run) == 0
    text = out.getvalue()
    assert "wsl --shutdown" in text and "pid 3701 python" in text and run.calls == []


def test_interop_off_prints_the_command():
    out, run = io.StringIO(), Recorder()
    assert restart_mod.restart(platform=WSL2, interop=False, gpus=[], stdout=out, run=run) == 0
    assert "interop is off" in out.getvalue() and "    wsl --shutdown" in out.getvalue()
    assert "open a new terminal" in out.getvalue() and run.calls == []


def _fake_wsl_exe(monkeypatch, tmp_path):
    exe = tmp_path / "wsl.exe"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return str(exe)


def test_no_tty_no_yes_refuses(monkeypatch, tmp_path):
    _fake_wsl_exe(monkeypatch, tmp_path)
    out, run = io.StringIO(), Recorder()
    code = restart_mod.restart(platform=WSL2, interop=True, gpus=[], stdin=io.StringIO(""), stdout=out, run=run)
    assert code == 1 and "--yes" in out.getvalue() and run.calls == []
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")  # `make wsl-restart`: named the way it was run
    out = io.StringIO()
    assert restart_mod.restart(platform=WSL2, interop=True, gpus=[], stdin=io.StringIO(""), stdout=out, run=run) == 1
    assert "`make wsl-restart ARGS=--yes`" in out.getvalue() and "vlkit wsl" not in out.getvalue()


def test_confirmed_on_a_tty_runs_wsl_shutdown(monkeypatch, tmp_path):
    exe = _fake_wsl_exe(monkeypatch, tmp_path)
    out, run = io.StringIO(), Recorder()
    assert restart_mod.restart(platform=WSL2, interop=True, gpus=k80_gpus(), stdin=Tty("y\n"), stdout=out, run=run) == 0
    assert run.calls == [[exe, "--shutdown"]]
    assert "open a new terminal" in out.getvalue()


def test_declined_does_nothing(monkeypatch, tmp_path):
    _fake_wsl_exe(monkeypatch, tmp_path)
    out, run = io.StringIO(), Recorder()
    assert restart_mod.restart(platform=WSL2, interop=True, gpus=[], stdin=Tty("n\n"), stdout=out, run=run) == 0
    assert run.calls == [] and "Nothing done" in out.getvalue()


def test_yes_runs_the_real_executable(monkeypatch, tmp_path):
    _fake_wsl_exe(monkeypatch, tmp_path)
    out = io.StringIO()
    assert restart_mod.restart(yes=True, platform=WSL2, interop=True, gpus=[], stdout=out) == 0
