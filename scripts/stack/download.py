"""Models into (and out of) the shared Hugging Face cache, from the host.

The cache both profiles mount is the host's own hub cache, so the host downloads with
huggingface_hub's resumable, progress-bar download and no container is involved.
"""
from __future__ import annotations

from pathlib import Path

from scripts.hf_cache import hub_cache
from scripts.usage import command, setting

# What serving needs; skips duplicate .bin/.pth weights and originals some repos carry.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class DownloadError(RuntimeError):
    pass


def download(model: str, cache_dir: Path | None = None) -> Path:
    """Fetch `model` (hub id) into the cache with progress bars; resumes partial downloads.

    Offline (the hub unreachable) a complete earlier download is used as it is. Every failure is a
    DownloadError whose message is one line: what happened and what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    cache = cache_dir or hub_cache()
    again = f"`{command('download', model=model)}`"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return Path(snapshot_download(model, cache_dir=cache, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:  # before its parent class, RepositoryNotFoundError
        raise DownloadError(f"{model} is gated: accept its terms on huggingface.co/{model}, log in with "
                            f"`hf auth login`, then {again} again") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{model}: no such model on the Hugging Face hub (check the id, e.g. "
                            "Qwen/Qwen3-VL-4B-Instruct)") from None
    except HFValidationError:
        raise DownloadError(f"{model!r} is neither a model folder here nor a hub id (org/name, e.g. "
                            "Qwen/Qwen3-VL-4B-Instruct)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        failure = e
    try:  # offline: an earlier complete download will do
        return Path(snapshot_download(model, cache_dir=cache, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass
    if isinstance(failure, LocalEntryNotFoundError):  # the hub did not answer (or offline mode is on)
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub does not answer (offline?)"
        raise DownloadError(f"cannot download {model}: {why}, and it is not in the cache {cache}. Connect to "
                            f"the internet and run {again} again, or use a model folder: "
                            f"{setting('model', '/path/to/folder')}") from None
    if isinstance(failure, HfHubHTTPError):
        status = getattr(failure.response, "status_code", "an error")
        raise DownloadError(f"cannot download {model}: the Hugging Face hub answered {status}; "
                            f"run {again} again later (it resumes)") from None
    raise DownloadError(f"cannot write {model} into the cache {cache}: {failure.strerror or failure}. Free some "
                        "space, or put the cache on a larger disk: `export VLKIT_HF_CACHE=/path/on/that/disk`") from None


def remove_from_cache(model: str, cache_dir: Path | None = None) -> int:
    """Delete every cached revision of `model`; returns the bytes freed (0 when not cached)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir or hub_cache())
    except CacheNotFound:  # no cache folder yet: nothing cached
        return 0
    revisions = [rev.commit_hash for repo in info.repos if repo.repo_id == model for rev in repo.revisions]
    if not revisions:
        return 0
    strategy = info.delete_revisions(*revisions)
    strategy.execute()
    return strategy.expected_freed_size
