"""`vlkit plan`: print the plan (a budget table and the flags), or --json. Exit 0 fits, 3 does not."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from . import options

# 2 is argparse's (a flag it refuses): a plan that does not fit is a status of its own, so that a
# script tells "change the card, model or context" from "fix the command line". `vlkit k8s` shares it.
EXIT_FITS, EXIT_ERROR, EXIT_DOES_NOT_FIT = 0, 1, 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compute the vLLM / service settings that fit the GPU",
        description="Plan the memory of a Qwen3-VL deployment: a budget table and the settings. "
                    "Exit 0 when the plan fits, 3 when it cannot (the refusal names the next step), "
                    "1 on input the planner refuses, 2 on a flag argparse refuses.")
    options.add(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scripts.usage import command

    from . import UnknownModelError, plan_for

    try:
        plan = plan_for(**options.plan_kwargs(args))
    except options.NoGpu as e:
        print(f"vlkit plan: no NVIDIA GPU answers here ({e}). To plan for a card by its size: "
              f"`{command('plan', gpu_memory='8GiB')}`; `{command('doctor')}` checks the driver.", file=sys.stderr)
        return EXIT_ERROR
    except (UnknownModelError, ValueError) as e:
        print(f"vlkit plan: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render(plan)
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def command_line(plan) -> str:
    if plan.profile == "16gb":
        return shlex.join(["vllm", "serve", plan.model, *plan.vllm_args])
    return "\n".join(f"{k}={shlex.quote(v)}" for k, v in plan.service_env.items())


def render(plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = (f"{plan.model} · profile {plan.profile} · vLLM {plan.vllm_version}" if plan.profile == "16gb"
             else f"{plan.model} · profile 8gb (vlkit service)")
    table = Table(title=title, title_justify="left")
    table.add_column("budget")
    table.add_column("GiB", justify="right")
    table.add_column("note", overflow="fold")
    for row in plan.budget:
        # Counts, not GiB: "concurrent sequences" (a multiple) and the flags' values.
        value = (f"{row.gib:g}x" if "sequences" in row.name else f"{row.gib:g}" if row.name.startswith("--")
                 else f"{row.gib:.2f}")
        style = "red" if row.gib < 0 else None
        table.add_row(row.name, value, row.note, style=style)
    console.print(table)
    for note in plan.notes:
        console.print(f"[dim]{note}[/dim]")
    if plan.fits:
        console.print(f"[green]fits[/green]: context {plan.context} tokens, KV cache {plan.kv_cache_tokens} "
                      f"tokens, needs {plan.required_free_bytes / 1024**3:.2f} GiB free at start")
        console.print(command_line(plan), markup=False, highlight=False, soft_wrap=True)
    else:
        if plan.evaluated:
            console.print(command_line(plan), markup=False, highlight=False, soft_wrap=True)
        console.print("[red]does not fit[/red]: ", end="")
        console.print(plan.refusal or "", markup=False, highlight=False)
