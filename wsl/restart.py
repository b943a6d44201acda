"""`vlkit wsl restart`: the "restart WSL" rung of the troubleshooting ladder, done safely.

`wsl.exe --shutdown` stops every WSL distro and the WSL VM: VRAM and RAM held by anything inside
WSL (a crashed server, Xwayland, containers) are freed, and a changed .wslconfig takes effect. It
also ends this terminal session, so we explain first, ask, and say how to come back.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Callable, TextIO

from scripts.gpu import GpuInfo, probe
from scripts.usage import command
from wsl.host import Platform, detect_platform, interop_enabled, windows_exe

POWERSHELL_COMMAND = "wsl --shutdown"


def come_back() -> str:
    return ("Then open a new terminal (Windows Terminal, or run `wsl` in PowerShell), go back to this "
            f"folder and run `{command('doctor')}`, then `{command('up')}`.")


def describe_consumers(gpus: list[GpuInfo]) -> list[str]:
    """One line per process holding VRAM, largest first; unknown sizes (WSL) last."""
    lines = []
    for g in gpus:
        procs = sorted(g.processes, key=lambda p: -(p.used_bytes or -1))
        for p in procs:
            size = f"{p.used_bytes / 1024 ** 2:.0f} MiB" if p.used_bytes is not None else "size not reported under WSL"
            lines.append(f"GPU {g.index}: pid {p.pid} {p.name} ({size})")
    return lines


def confirm(question: str, stdin: TextIO, stdout: TextIO) -> bool:
    stdout.write(f"{question} [y/N] ")
    stdout.flush()
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def restart(yes: bool = False, *, platform: Platform | None = None, interop: bool | None = None,
            gpus: list[GpuInfo] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
            run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Explain, list GPU consumers, confirm, then `wsl.exe --shutdown`. Returns an exit code:
    0 shutdown started or instructions printed, 1 refused (no TTY and no --yes) or failed."""
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    platform = platform or detect_platform()
    say = lambda text="": print(text, file=out)  # noqa: E731

    say("What this does: `wsl --shutdown` stops every WSL distro and the WSL VM. Memory and VRAM held by")
    say("anything inside WSL (a stuck server, Xwayland, containers) is freed and .wslconfig changes take effect.")
    say(f"Docker containers stop too; `{command('up')}` starts them again.")
    say()
    gpus = probe().gpus if gpus is None else gpus
    consumers = describe_consumers(gpus)
    if consumers:
        say("Programs holding VRAM now (close the ones you do not need, on Windows too):")
        for line in consumers:
            say(f"  - {line}")
    else:
        say("No process reports VRAM use from here.")
    say("Windows programs (browsers, Discord, games) also hold VRAM: see Task Manager > Performance > GPU,")
    say("or run `nvidia-smi` in PowerShell.")
    say()

    if not platform.is_wsl:
        say("This is not WSL, so there is nothing to shut down from here. On a Windows PC, in PowerShell:")
        say(f"    {POWERSHELL_COMMAND}")
        return 0
    interop = interop_enabled() if interop is None else interop
    wsl_exe = windows_exe("wsl.exe") if interop else None
    if not wsl_exe:
        say("Windows interop is off in this distro ([interop] enabled=false in /etc/wsl.conf), so run this in")
        say("PowerShell yourself:")
        say(f"    {POWERSHELL_COMMAND}")
        say(come_back())
        return 0
    if not yes:
        if not stdin.isatty():
            say("Refusing to shut WSL down without confirmation: no terminal to ask on. "
                f"Run `{command('wsl-restart', yes=True)}`.")
            return 1
        if not confirm("Shut down WSL now? This terminal will close.", stdin, out):
            say("Nothing done.")
            return 0
    say("Shutting WSL down now. " + come_back())
    out.flush()
    try:
        proc = run([wsl_exe, "--shutdown"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"wsl.exe --shutdown failed: {exc}. Run `{POWERSHELL_COMMAND}` in PowerShell.")
        return 1
    if proc.returncode != 0:
        say(f"wsl.exe --shutdown failed ({(proc.stderr or proc.stdout).strip()}). Run `{POWERSHELL_COMMAND}` in PowerShell.")
        return 1
    return 0
