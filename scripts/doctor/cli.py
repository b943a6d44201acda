"""`vlkit doctor` and `vlkit health`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scripts.planner import options
from scripts.usage import command

MARKS = {"ok": ("[green]✔ ok  [/]", "ok  "), "warn": ("[yellow]! warn[/]", "warn"), "fail": ("[red]✘ fail[/]", "FAIL")}


def register(subparsers) -> None:
    doctor = subparsers.add_parser("doctor", help="check this machine: WSL, driver, GPU, Docker, disk, plan",
                                   description="One line per check: status, what was found, the fix. "
                                               "Exit 0 when ready, 1 when a blocking check fails.")
    doctor.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    doctor.add_argument("--gpu-container", action="store_true",
                        help="also run `nvidia-smi` in a container with --gpus all (slow; cached for a day)")
    options.add(doctor, "profile", "model")
    doctor.add_argument("--wslconfig", type=Path, help="the .wslconfig to inspect (default: found through interop)")
    doctor.add_argument("--port", type=options.port, help="the API port to check (default $VLKIT_PORT, else 8000)")
    doctor.set_defaults(func=doctor_command)

    health = subparsers.add_parser("health", help="the gate `make up` runs: driver answers, no ECC/Xid errors, enough free VRAM")
    options.add(health, "profile", "model")
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=health_command)


def _render(checks, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True, style="bold")
    table.add_column("found / fix", overflow="fold")
    for c in checks:
        cell = Text(c.found)
        if c.fix and c.status != "ok":
            cell.append("\n→ " + c.fix, style="cyan")
        table.add_row(MARKS[c.status][0] if console.is_terminal else MARKS[c.status][1], c.name, cell)
    if console.is_terminal:
        console.print(table)
    else:  # a file, a pipe, a CI log: no width to fit, so no fix's command broken over lines
        wide = Console(highlight=False, width=10_000)
        with wide.capture() as captured:
            wide.print(table)
        print("\n".join(line.rstrip() for line in captured.get().splitlines()))
    blocking = [c.name for c in checks if c.blocking]
    if blocking:
        console.print(f"[red bold]Not ready[/]: fix {', '.join(blocking)} first. ({elapsed:.1f} s)")
    else:
        warns = sum(c.status == "warn" for c in checks)
        console.print(f"[green bold]Ready[/]{f' ({warns} warning(s))' if warns else ''}. ({elapsed:.1f} s)")


def doctor_command(args: argparse.Namespace) -> int:
    from scripts.doctor.facts import Options
    from scripts.doctor.run import ready, run_checks

    start = time.monotonic()
    options = Options(profile=args.profile, model=args.model, gpu_container=args.gpu_container, wslconfig=args.wslconfig,
                      port=args.port)
    checks = run_checks(options)
    if args.json:
        print(json.dumps([c.model_dump() for c in checks], indent=2))
    else:
        _render(checks, time.monotonic() - start)
    return 0 if ready(checks) else 1


def required_free_bytes(profile: str, model: str | None) -> tuple[int | None, str | None]:
    """The plan's VRAM need for the gate, or (None, why) when there is no plan to ask."""
    from scripts.doctor.facts import Options, default_models
    try:
        from scripts.planner import plan_for
    except ImportError as exc:
        return None, f"planner not available ({exc}): free VRAM not checked"
    models = default_models(Options(model=model))
    try:
        plan = plan_for(model=models.get(profile, models["8gb"]), profile=profile)
    except Exception as exc:
        return None, f"no plan ({type(exc).__name__}: {exc}): free VRAM not checked"
    if not plan.fits:
        return None, f"the plan does not fit: {plan.refusal}"
    return plan.required_free_bytes, None


def health_command(args: argparse.Namespace) -> int:
    from wsl.health import gate

    need, note = required_free_bytes(args.profile, args.model)
    result = gate(need)
    if note and need is None and note.startswith("the plan does not fit"):
        result.ok = False
        result.reasons.append(note)
        result.fixes.append(f"`{command('plan', profile=args.profile)}` shows the next step")
    if args.json:
        print(json.dumps({**result.to_dict(), "profile": args.profile, "required_free_bytes": need, "note": note}, indent=2))
        return 0 if result.ok else 1
    out = sys.stdout if result.ok else sys.stderr
    if note and result.ok:
        print(f"note: {note}", file=out)
    if result.ok:
        free = f"{result.free_bytes / 1024 ** 3:.1f} GiB free" if result.free_bytes is not None else ""
        print(f"GPU healthy: driver answers, no ECC/Xid errors reported, {free}.", file=out)
        return 0
    print("GPU not ready:", file=out)
    for reason in result.reasons:
        print(f"  - {reason}", file=out)
    for fix in dict.fromkeys(result.fixes):
        print(f"  fix: {fix}", file=out)
    return 1
