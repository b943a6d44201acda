"""The plan's inputs as command-line options, declared once for `vlkit plan`, `up`, `build` and
`doctor`: the same names, types, limits and help everywhere, and one translation into
`plan_for(...)` keyword arguments. Bad values are argparse errors before anything runs
(`--context 0`, `--gpu-memory-utilization 5`, `--gpu-memory 8XB`)."""
from __future__ import annotations

import argparse
import os
import re

from .sizes import memory_arg

PROFILES = ("8gb", "16gb", "auto")
MIN_CONTEXT = 16   # plan_for's floor: a prompt and an answer need some room


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def fraction(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], e.g. 0.9; got {text}")
    return value


def at_least(minimum: int):
    """An argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def context_tokens(text: str) -> int:
    """A context length as vLLM's --max-model-len reads it (vllm/utils/argparse_utils.py
    human_readable_int): 4096, 4k (4000), 4K (4096), 25.6k; at least MIN_CONTEXT."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM])", text.strip())
    if m is None:
        value = _number(text, int, "a number of tokens (4096, 4k = 4000, 4K = 4096)")
    elif m.group(2).islower():
        value = int(float(m.group(1)) * {"k": 10**3, "m": 10**6}[m.group(2)])
    elif "." in m.group(1):
        raise argparse.ArgumentTypeError(f"{text}: no decimals with the binary {m.group(2)} (as in vLLM); "
                                         f"write {m.group(1)}{m.group(2).lower()} (decimal) or a whole number")
    else:
        value = int(m.group(1)) * {"K": 2**10, "M": 2**20}[m.group(2)]
    if value < MIN_CONTEXT:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_CONTEXT} tokens, got {text}")
    return value


def port(text: str) -> int:
    value = _number(text, int, "a port number")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {text}")
    return value


def default_model() -> str:
    """The model when none is given: $VLKIT_MODEL (what `python -m service` would serve), else the
    service's default (service/settings.py is its one definition)."""
    from service.settings import ENV_PREFIX, ServiceSettings

    return os.environ.get(f"{ENV_PREFIX}MODEL") or ServiceSettings.model_fields["model"].default


# name -> (flag, argparse keywords); `add` declares a subset, `plan_kwargs` reads whatever was declared.
_OPTIONS = {
    "profile": ("--profile", dict(default="auto", help="8gb: vlkit's transformers service; 16gb: vLLM; "
                                                        "auto: pick from the card's VRAM (default)")),
    "model": ("--model", dict(metavar="ID_OR_DIR",
                              help="hub id or local model folder (default: $VLKIT_MODEL, else the service's "
                                   "default, Qwen/Qwen3-VL-2B-Instruct)")),
    "context": ("--context", dict(type=context_tokens, metavar="TOKENS",
                                  help="wanted context (prompt + answer) in tokens: 4096, 4K (4096), 4k (4000)")),
    "gpu_memory": ("--gpu-memory", dict(type=memory_arg, metavar="SIZE",
                                        help="plan for a card of this size instead of this machine's "
                                             "(8GiB, 8GB, 8192MiB, 16G)")),
    "gpu_memory_utilization": ("--gpu-memory-utilization", dict(
        type=fraction, metavar="F",
        help="16gb: evaluate this vLLM setting (vLLM's defaults for the rest) instead of choosing one")),
    "gpus": ("--gpus", dict(type=at_least(1), default=1, metavar="N", help="GPUs to use (tensor parallel)")),
}
# plan_for's name for an option, where it differs.
_PLAN_FOR_NAMES = {"gpu_memory": "gpu_memory_bytes", "gpus": "gpu_count"}


def add(parser: argparse.ArgumentParser, *names: str, profiles: tuple[str, ...] = PROFILES) -> None:
    """Declare these plan options (all when none are named) on `parser`; `profiles` are the
    --profile choices (`vlkit build` adds "all")."""
    for name in names or tuple(_OPTIONS):
        flag, kwargs = _OPTIONS[name]
        # type before choices: PROFILE=8GB (how cards are sold) is the 8gb profile
        kwargs = dict(kwargs, choices=profiles, type=str.lower) if name == "profile" else kwargs
        parser.add_argument(flag, dest=name, **kwargs)


class NoGpu(LookupError):
    """Nothing to plan for: no --gpu-memory, and no NVIDIA GPU answers. The message is why not
    (the driver probe's own words); each command adds what to do in its own terms."""


def plan_kwargs(args: argparse.Namespace) -> dict:
    """`plan_for(...)` keyword arguments from the options `add` declared: a missing model is the
    default one, and without --gpu-memory the card is this machine's GPUs (NoGpu when none answers)."""
    out = {_PLAN_FOR_NAMES.get(name, name): getattr(args, name) for name in _OPTIONS if hasattr(args, name)}
    out["model"] = out.get("model") or default_model()
    if out.get("gpu_memory_bytes") is None:
        from scripts.gpu import probe

        found = probe()
        if not found.gpus:
            raise NoGpu(found.error or "no NVIDIA GPU found")
        out["gpus"] = found.gpus
    return out
