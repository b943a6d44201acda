"""Shared bits for the doctor/WSL tests: recorded data, a fake `nvidia-smi` that replays real
recordings (this machine has no GPU), and a parser with only the doctor's and WSL's commands."""
from __future__ import annotations

import argparse
import stat
from pathlib import Path

DATA = Path(__file__).parent / "data"
H100 = DATA / "nvidia-smi" / "h100-linux"
PUBLIC = DATA / "public"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def fake_nvidia_smi(bin_dir: Path, *, table: Path, query_gpu: Path, query_apps: Path, q: Path) -> Path:
    """An executable `nvidia-smi` printing the recorded output that matches its arguments."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) exec cat '{query_gpu}' ;;
  --query-compute-apps=*) exec cat '{query_apps}' ;;
  -q) exec cat '{q}' ;;
  "") exec cat '{table}' ;;
esac
echo "unexpected arguments: $*" >&2; exit 2
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def h100_smi(bin_dir: Path) -> Path:
    return fake_nvidia_smi(bin_dir, table=H100 / "nvidia-smi.txt", query_gpu=H100 / "query-gpu.csv",
                           query_apps=H100 / "query-apps.csv", q=H100 / "nvidia-smi-q.txt")


def parser() -> argparse.ArgumentParser:
    from scripts.doctor import cli as doctor_cli
    from wsl import cli as wsl_cli

    p = argparse.ArgumentParser(prog="vlkit")
    sub = p.add_subparsers()
    doctor_cli.register(sub)
    wsl_cli.register(sub)
    return p


def run_cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)

