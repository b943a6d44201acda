"""Memory sizes as people write them (8GiB, 8GB, 8192MiB, 16G, 7.5 GiB) and as messages show them."""
from __future__ import annotations

import argparse
import re

from service.sizing import GIB

# Cards are sold in binary units ("8 GB" = 8 GiB of VRAM), so G/GB/GiB all mean 2**30.
_UNITS = {"": 2**30, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)


def parse_size(text: str) -> int:
    """Bytes from '8GiB', '8GB', '8192MiB', '16G' or a bare number of GiB."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 8GiB, 8GB, 8192MiB, 16G)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 2**30 // 2:
        raise ValueError(f"{text!r} is under 0.5 GiB: not a GPU's memory")
    return value


MAX_BARE_GIB = 1024  # no GPU has a TiB: a bare number above it is nvidia-smi's MiB, pasted


def memory_arg(text: str) -> int:
    """parse_size as an argparse type (`--gpu-memory`), so every command reads sizes alike."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if str(text).strip().replace(".", "", 1).isdigit() and value > MAX_BARE_GIB * 2**30:
        raise argparse.ArgumentTypeError(f"{text.strip()} without a unit is GiB, more than any GPU has; for MiB "
                                         f"(as nvidia-smi shows it) write {text.strip()}MiB")
    return value


def gib(n: int | float) -> str:
    """Bytes as a message shows them: GiB, two decimals (vLLM's own messages do the same)."""
    return f"{n / GIB:.2f}"
