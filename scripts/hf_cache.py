"""The one Hugging Face hub cache every vlkit command uses: the doctor checks it, `vlkit download`
fills it, `vlkit clean MODEL=...` empties it, the planner reads model configs from it and
`vlkit up` bind-mounts it into both profiles' containers.

Precedence, the first one set wins:
1. VLKIT_HF_CACHE, vlkit's own (what the doctor suggests to put models on a larger disk);
2. huggingface_hub's own rule (HF_HUB_CACHE, else $HF_HOME/hub, else
   $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub), so that models other tools
   downloaded are reused.
docker/compose.yaml spells the same rule as nested defaults for a plain `docker compose up`
(tests/test_hf_cache.py holds the two equal).
"""
from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "VLKIT_HF_CACHE"


def hub_cache() -> Path:
    """The hub cache directory (it may not exist yet), absolute: compose reads a relative bind
    source as a volume name or relative to docker/, not to where the user ran vlkit."""
    if os.environ.get(VARIABLE):
        return Path(os.environ[VARIABLE]).expanduser().absolute()
    from huggingface_hub import constants  # reads HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME at import

    return Path(constants.HF_HUB_CACHE).expanduser().absolute()
