"""`vlkit`: the one host CLI every make target calls.

Each area registers its own subcommands; this module only wires them together, importing lazily so
that `vlkit plan` never pays for what `vlkit up` needs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand area -> module exposing register(subparsers)
AREAS = (
    "scripts.planner.cli",   # plan
    "scripts.doctor.cli",    # doctor, health
    "wsl.cli",               # wsl config, wsl restart
    "scripts.stack.cli",     # up, down, logs, status, build, download, caption, clean
    "scripts.k8s.cli",       # k8s
)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad setting under make told as one line in make's terms (PROFILE, not
    --profile), without a usage text of flags the user did not type. Subcommands inherit it."""

    def error(self, message: str):
        from scripts.usage import in_make_terms, via_make

        if not via_make():
            super().error(message)
        self.exit(2, f"{self.prog}: {in_make_terms(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vlkit", description="Serve Qwen3-VL on one consumer NVIDIA GPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, where a closed pipe could only be reported as a failure
    except BrokenPipeError:
        # The reader stopped early (`vlkit up --dry-run | head -1`): end quietly. Python's recipe
        # (docs.python.org/3/library/signal.html#note-on-sigpipe), which rich's console follows too:
        # stdout to devnull so that the exit's own flush has nowhere to fail, then status 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
