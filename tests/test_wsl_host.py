"""wsl/host.py: WSL2 / WSL1 / Linux from real /proc/version strings, Windows paths, RAM."""
from __future__ import annotations

import pytest

from tests.doctor_helpers import PUBLIC, read
from wsl import host


@pytest.mark.parametrize("name, kind", [
    ("proc-version-wsl2-5.4.72.txt", "wsl2"),
    ("proc-version-wsl2-4.19.67.txt", "wsl2"),
    ("proc-version-wsl1-18985.txt", "wsl1"),
    ("proc-version-wsl1-14393.txt", "wsl1"),
])
def test_classify_real_proc_version(name, kind):
    assert host.classify(read(PUBLIC / name)) == kind


@pytest.mark.parametrize("osrelease", [
    "5.15.167.4-microsoft-standard-WSL2", "5.10.16.3-microsoft-standard-WSL2", "5.15.79.1-microsoft-standard-WSL2"])
def test_classify_real_wsl2_osrelease(osrelease):
    assert host.classify("", osrelease) == "wsl2"


def test_this_machine_is_native_linux():
    p = host.detect_platform()
    assert p.kind == "linux" and not p.is_wsl
    assert host.classify(p.proc_version, p.kernel) == "linux"
    # a custom WSL2 kernel without "microsoft" is still WSL when WSL's environment says so
    assert host.classify(p.proc_version, p.kernel, wsl_env=True) == "wsl2"


def test_kernel_version():
    assert host.kernel_version("5.15.167.4-microsoft-standard-WSL2") == (5, 15, 167, 4)
    assert host.kernel_version("4.4.0-18985-Microsoft") == (4, 4, 0)
    assert host.kernel_version("") == ()


def test_windows_to_wsl_path():
    assert host.windows_to_wsl_path("C:\\Users\\Ana Lucia") == "/mnt/c/Users/Ana Lucia"
    assert host.windows_to_wsl_path("D:\\") == "/mnt/d"
    with pytest.raises(ValueError):
        host.windows_to_wsl_path("\\\\wsl$\\Ubuntu")


def test_host_ram_here_comes_from_meminfo():
    ram = host.host_ram(use_cache=False)
    total = host.meminfo_total_bytes()
    assert ram.bytes == total > 0 and not ram.is_windows_total
    assert host.meminfo_total_bytes("MemTotal:       16303868 kB\nMemFree: 1 kB\n") == 16303868 * 1024


def test_windows_facts_absent_off_wsl(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(host, "WINDOWS_SYSTEM32", str(tmp_path / "nowhere"))
    assert host.windows_userprofile() is None
    assert not host.interop_enabled()
