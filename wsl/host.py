"""Where we run (WSL2, WSL1 or plain Linux) and the Windows-side facts WSL can reach through interop.

WSL2 kernels report e.g. ``5.15.167.4-microsoft-standard-WSL2`` (older: ``4.19.67-microsoft-standard``);
WSL1 has no real kernel and reports e.g. ``4.4.0-18985-Microsoft``. Windows facts (the profile folder
holding .wslconfig, the host's RAM) come from cmd.exe / powershell.exe, which need WSL interop;
they are cached in ~/.cache/vlkit because starting Windows programs takes about a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from service.host_memory import meminfo

WINDOWS_SYSTEM32 = "/mnt/c/Windows/System32"
INTEROP_FLAG = "/proc/sys/fs/binfmt_misc/WSLInterop"
CACHE_TTL_S = 7 * 24 * 3600  # the profile folder and the RAM of a PC change rarely


@dataclass(frozen=True)
class Platform:
    kind: str  # "wsl2" | "wsl1" | "linux"
    kernel: str  # /proc/sys/kernel/osrelease, e.g. "5.15.167.4-microsoft-standard-WSL2"
    proc_version: str

    @property
    def is_wsl(self) -> bool:
        return self.kind in ("wsl1", "wsl2")


def classify(proc_version: str, osrelease: str = "", wsl_env: bool = False) -> str:
    """'wsl2' | 'wsl1' | 'linux' from /proc/version and /proc/sys/kernel/osrelease (pure).

    wsl_env: WSL_DISTRO_NAME / WSLInterop seen, for WSL2 custom kernels without "microsoft"."""
    text = f"{osrelease} {proc_version}"
    if re.search(r"microsoft-standard|WSL2", text, re.IGNORECASE):
        return "wsl2"
    if re.search(r"-Microsoft\b|Microsoft@Microsoft\.com", text):  # WSL1's fixed signature
        return "wsl1"
    if "microsoft" in text.lower() or wsl_env:
        return "wsl2"
    return "linux"


def kernel_version(osrelease: str) -> tuple[int, ...]:
    """'5.15.167.4-microsoft-standard-WSL2' -> (5, 15, 167, 4)."""
    m = re.match(r"(\d+(?:\.\d+)*)", osrelease.strip())
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def detect_platform() -> Platform:
    proc_version = _read("/proc/version")
    osrelease = _read("/proc/sys/kernel/osrelease")
    wsl_env = bool(os.environ.get("WSL_DISTRO_NAME")) or os.path.exists(INTEROP_FLAG)
    return Platform(classify(proc_version, osrelease, wsl_env), osrelease, proc_version)


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 exactly when /run/systemd/system exists."""
    return os.path.isdir("/run/systemd/system")


def windows_exe(name: str) -> str | None:
    """A Windows program reachable from WSL: on PATH (appendWindowsPath) or in System32."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (WINDOWS_SYSTEM32, f"{WINDOWS_SYSTEM32}/WindowsPowerShell/v1.0"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return None


def interop_enabled() -> bool:
    """Can this WSL session start Windows programs? ([interop] enabled=false in wsl.conf turns it off.)"""
    state = _read(INTEROP_FLAG)
    return state.startswith("enabled") and windows_exe("cmd.exe") is not None


def is_windows_path(text: str) -> bool:
    """'C:\\...' or 'C:/...': a path as Windows writes it (in WSL, a file of that name would be in
    this folder, which is never what was meant)."""
    return re.match(r"[A-Za-z]:[\\/]", str(text).strip()) is not None


def windows_to_wsl_path(win_path: str, mount_root: str = "/mnt/") -> str:
    """'C:\\Users\\Ana' -> '/mnt/c/Users/Ana' (what `wslpath -u` does with the default automount)."""
    win_path = win_path.strip()
    m = re.match(r"^([A-Za-z]):[\\/]*(.*)$", win_path)
    if not m:
        raise ValueError(f"not a Windows drive path: {win_path!r}")
    rest = m.group(2).replace("\\", "/").rstrip("/")
    return f"{mount_root.rstrip('/')}/{m.group(1).lower()}" + (f"/{rest}" if rest else "")


def _run_windows(cmd: list[str], timeout: float) -> str | None:
    try:
        # cwd on the Windows drive: cmd.exe refuses a UNC current directory (\\wsl$\...)
        cwd = "/mnt/c" if os.path.isdir("/mnt/c") else None
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlkit" / "windows-host.json"


def _cache_get(key: str):
    try:
        data = json.loads(_cache_path().read_text())
        entry = data[key]
        if time.time() - entry["at"] < CACHE_TTL_S:
            return entry["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _cache_put(key: str, value) -> None:
    path = _cache_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"at": time.time(), "value": value}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache, nothing more


def windows_userprofile(timeout: float = 5.0, use_cache: bool = True) -> Path | None:
    """The Windows profile folder (where .wslconfig lives) as a WSL path, or None without interop."""
    if use_cache and isinstance(cached := _cache_get("userprofile"), str) and cached:
        return Path(cached)
    win = None
    if shutil.which("wslvar"):  # from wslu, present on Ubuntu
        win = _run_windows(["wslvar", "USERPROFILE"], timeout)
    if not win and (cmd := windows_exe("cmd.exe")):
        win = _run_windows([cmd, "/d", "/c", "echo %USERPROFILE%"], timeout)
    if not win or "%" in win:
        return None
    win = win.splitlines()[-1].strip()
    linux = None
    if shutil.which("wslpath"):
        linux = _run_windows(["wslpath", "-u", win], timeout)
    if not linux:
        try:
            linux = windows_to_wsl_path(win)
        except ValueError:
            return None
    _cache_put("userprofile", linux)
    return Path(linux)


def meminfo_total_bytes(text: str | None = None) -> int | None:
    """MemTotal from /proc/meminfo (pure when given text). Inside WSL2 this is the VM's limit."""
    return meminfo(_read("/proc/meminfo") if text is None else text).get("MemTotal")


@dataclass(frozen=True)
class HostRam:
    bytes: int
    source: str  # how we know: "Windows (Win32_ComputerSystem)" or the /proc/meminfo fallback

    @property
    def is_windows_total(self) -> bool:
        return self.source.startswith("Windows")


def host_ram(timeout: float = 15.0, use_cache: bool = True, allow_interop: bool = True) -> HostRam | None:
    """The Windows host's physical RAM via interop (PowerShell CIM, then wmic); else the WSL VM's
    own MemTotal, which is the .wslconfig limit (default: half the host RAM), not the host total."""
    # a cache file edited or half-written by hand must not stop the doctor: only a positive int counts
    if use_cache and isinstance(cached := _cache_get("host_ram_bytes"), int) and cached > 0:
        return HostRam(cached, "Windows (Win32_ComputerSystem, cached)")
    if allow_interop and detect_platform().is_wsl and interop_enabled():
        value = None
        if ps := windows_exe("powershell.exe"):
            value = _run_windows([ps, "-NoProfile", "-NonInteractive", "-Command",
                                  "(Get-CimInstance Win32_ComputerSystem).TotalPhysicalMemory"], timeout)
        if not (value and value.strip().isdigit()) and (wmic := windows_exe("wmic.exe")):
            out = _run_windows([wmic, "ComputerSystem", "get", "TotalPhysicalMemory"], timeout) or ""
            value = next((t for t in out.split() if t.isdigit()), None)
        if value and value.strip().isdigit():
            _cache_put("host_ram_bytes", int(value))
            return HostRam(int(value), "Windows (Win32_ComputerSystem)")
    total = meminfo_total_bytes()
    if total is None:
        return None
    return HostRam(total, "/proc/meminfo (inside WSL: the VM's limit, not the Windows total)")
