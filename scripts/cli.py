"""`vlkit`: the one host CLI every make target calls.

Each area registers its own subcommands; this module only wires them together, importing lazily so
that `vlkit plan` never pays for what `vlkit up` needs.
"""
from __future__ import annotations

import argparse
import difflib
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


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command `args` chose (`vlkit wsl config`: config's), whose flags a misspelt one meant."""
    while True:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = subs and getattr(args, subs.dest, None)
        if name not in getattr(subs, "choices", {}):
            return parser
        parser = subs.choices[name]


def _resembles(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """'; did you mean --dry-run?' for the first unknown flag close to one of the command's
    (argparse suggests none: Python 3.14's suggest_on_error covers mistyped choices and subcommands only)."""
    from scripts.usage import MAKE_VARIABLES, setting, via_make

    flags = [f for a in parser._actions for f in a.option_strings if f.startswith("--")]
    for word in unknown:
        close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1) if word.startswith("--") else []
        if close:
            name = close[0][2:].replace("-", "_")
            meant = f"{MAKE_VARIABLES[name]}=" if via_make() and name in MAKE_VARIABLES else setting(name)
            return f"; did you mean {meant}?"
    return ""


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
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_resembles(unknown, _command_parser(parser, args))}")
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
