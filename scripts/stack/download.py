"""Models into (and out of) the shared Hugging Face cache, from the host.

The cache both profiles mount is the host's own hub cache, so the host downloads with
huggingface_hub's resumable, progress-bar download and no container is involved.
"""
from __future__ import annotations

from pathlib import Path

from scripts.stack.compose import hf_hub_cache

# What serving needs; skips duplicate .bin/.pth weights and originals some repos carry.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class DownloadError(RuntimeError):
    pass


def download(model: str, cache_dir: Path | None = None) -> Path:
    """Fetch `model` (hub id) into the cache with progress bars; resumes partial downloads.

    Offline (the hub unreachable) a complete earlier download is used as it is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    cache = cache_dir or hf_hub_cache()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return Path(snapshot_download(model, cache_dir=cache, allow_patterns=ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise DownloadError(f"{model}: no such model on the Hugging Face hub (check the id, e.g. "
                            "Qwen/Qwen3-VL-4B-Instruct)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        try:  # offline: an earlier complete download will do
            return Path(snapshot_download(model, cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
                                          local_files_only=True))
        except LocalEntryNotFoundError:
            raise DownloadError(f"cannot download {model} ({type(e).__name__}: {str(e)[:200]}) and it is "
                                f"not in the cache {cache}. Check the network, or copy the model there.") from None


def remove_from_cache(model: str, cache_dir: Path | None = None) -> int:
    """Delete every cached revision of `model`; returns the bytes freed (0 when not cached)."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir or hf_hub_cache())
    revisions = [rev.commit_hash for repo in info.repos if repo.repo_id == model for rev in repo.revisions]
    if not revisions:
        return 0
    strategy = info.delete_revisions(*revisions)
    strategy.execute()
    return strategy.expected_freed_size
