"""vlkit's version: the service's (system_fingerprint, /version) and the host tools' (the images'
tags) alike. Here, beside the service, because the 8gb image copies service/ and not scripts/; light
(no torch), because the host CLI imports it too."""
from __future__ import annotations

import functools
import re
from importlib import metadata
from pathlib import Path


@functools.cache
def vlkit_version() -> str:
    """The installed package's version; from a checkout that is not installed, pyproject.toml's (its
    one source); "unknown" where neither is there."""
    try:
        return metadata.version("vlkit")
    except metadata.PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else "unknown"
