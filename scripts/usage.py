"""How a message names a setting or a command: in the words the user typed.

Someone who runs `make up GPU_MEMORY=8GiB` is told `GPU_MEMORY=16GiB`, not `--gpu-memory 16GiB`;
someone who runs `vlkit up` directly is told the flag. The Makefile exports VLKIT_VIA_MAKE=1 to
every vlkit command it runs; every message that names a setting or a command goes through here.
"""
from __future__ import annotations

import os
import re
import shlex

# vlkit flag (argparse dest) -> the make variable that sets it (the Makefile's header lists them).
MAKE_VARIABLES = {
    "profile": "PROFILE",
    "model": "MODEL",
    "context": "CONTEXT",
    "gpu_memory": "GPU_MEMORY",
    "port": "PORT",
    "image": "IMG",
    "gpus": "GPUS",
}


def via_make() -> bool:
    return os.environ.get("VLKIT_VIA_MAKE") == "1"


def setting(name: str, value: object = None) -> str:
    """``GPU_MEMORY=8GiB`` under make, ``--gpu-memory 8GiB`` otherwise; a flag without a make
    variable goes through ``ARGS='--flag value'`` under make. ``value`` None: the bare name;
    True: a switch (``--cpu``, ``ARGS=--cpu``)."""
    flag = "--" + name.replace("_", "-")
    if value is True:  # a switch: the bare flag
        value = None
    shown = "" if value is None else str(value)
    if not via_make():
        return flag if value is None else f"{flag} {shlex.quote(shown)}"
    variable = MAKE_VARIABLES.get(name)
    if variable is not None:
        return variable if value is None else f"{variable}={shlex.quote(shown)}"
    return f"ARGS={shlex.quote(flag if value is None else f'{flag} {shown}')}"


def command(target: str, **settings: object) -> str:
    """The command that runs ``target`` with these settings: ``make up MODEL=x`` under make,
    ``vlkit up --model x`` otherwise. ``target`` is the make target (``wsl-config``); the vlkit
    command is the same words (``vlkit wsl config``)."""
    given = {name: value for name, value in settings.items() if value is not None}
    if not via_make():
        return " ".join(["vlkit", target.replace("-", " "), *(setting(n, v) for n, v in given.items())])
    parts = [setting(n, v) for n, v in given.items() if n in MAKE_VARIABLES]
    extra = " ".join(f"--{n.replace('_', '-')}" + ("" if v is True else f" {v}")
                     for n, v in given.items() if n not in MAKE_VARIABLES)
    return " ".join(["make", target, *parts, *([f"ARGS={shlex.quote(extra)}"] if extra else [])])


def in_make_terms(argparse_message: str) -> str:
    """An argparse error in the user's words under make: `argument --gpu-memory: ...` names
    GPU_MEMORY, leftover words name ARGS (or a value with a space that make split)."""
    def variable(m: re.Match) -> str:
        return setting(m.group(1).replace("-", "_")) + ": "
    message = re.sub(r"\bargument --([a-z][a-z0-9-]*)(?:/-\w)?: ", variable, argparse_message)
    if message.startswith("unrecognized arguments: "):
        message += " (from ARGS=: `make help` lists the targets, `.venv/bin/vlkit COMMAND -h` their flags)"
    return message
