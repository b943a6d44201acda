"""One Hugging Face hub cache for every command (scripts/hf_cache.py): VLKIT_HF_CACHE, else
huggingface_hub's rule. The doctor reports it, `download` fills it, `up` mounts it, and compose's own
default resolves to the same folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.docker_helpers import ROOT

CACHE_VARIABLES = ("VLKIT_HF_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
# (variables set, the cache they give), HOME=/home/u
CASES = [
    ({}, "/home/u/.cache/huggingface/hub"),
    ({"XDG_CACHE_HOME": "/x/xdg"}, "/x/xdg/huggingface/hub"),
    ({"HF_HOME": "/x/hf", "XDG_CACHE_HOME": "/x/xdg"}, "/x/hf/hub"),
    ({"HF_HUB_CACHE": "/x/hub", "HF_HOME": "/x/hf"}, "/x/hub"),
    ({"VLKIT_HF_CACHE": "/big/disk/hub", "HF_HUB_CACHE": "/x/hub", "HF_HOME": "/x/hf"}, "/big/disk/hub"),
]


def _env(home: str, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    return {**env, "HOME": home, **variables}


def _resolved(env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-c", "from scripts.hf_cache import hub_cache; print(hub_cache())"],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("variables, expected", CASES)
def test_precedence_vlkit_then_huggingface_hub_rule(variables, expected):
    assert _resolved(_env("/home/u", **variables)) == expected


@pytest.mark.parametrize("variable, folder", [("VLKIT_HF_CACHE", "models"), ("HF_HOME", "models/hub")])
def test_a_relative_cache_is_the_folder_under_where_vlkit_runs(variable, folder):
    """`VLKIT_HF_CACHE=models make up`: compose would read `models` as a named volume (or relative to
    docker/), and download would fill ./models: every command gets the one absolute folder."""
    assert _resolved(_env("/home/u", **{variable: "models"})) == str(ROOT / folder)


def _seed_cache(cache, repo="acme/tiny-vl", revision="0123456789abcdef0123456789abcdef01234567"):
    """A complete snapshot as huggingface_hub lays it out, so offline look-ups find it."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return repo, snapshot


def test_doctor_download_and_up_use_the_cache_the_doctor_names(tmp_path):
    cache = tmp_path / "big-disk" / "hub"
    repo, snapshot = _seed_cache(cache)
    env = _env(str(tmp_path / "home"), VLKIT_HF_CACHE=str(cache), HF_HUB_OFFLINE="1",
               VLKIT_UP_ENV_FILE=str(tmp_path / "vlkit.env"), VLKIT_OVERRIDE_FILE=str(tmp_path / "o.yaml"))
    vlkit = [sys.executable, "-m", "scripts"]

    doctor = subprocess.run([*vlkit, "doctor", "--json", "--model", repo], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    (row,) = [c for c in json.loads(doctor.stdout) if c["name"] == "model-cache"]
    assert row["found"] == f"cache {cache}: {repo} present"

    download = subprocess.run([*vlkit, "download", repo], env=env, cwd=ROOT, capture_output=True, text=True)
    assert download.returncode == 0, download.stderr
    assert str(snapshot) in download.stdout  # found offline in that cache, not in ~/.cache

    up = subprocess.run([*vlkit, "up", "--dry-run", "--json", "--profile", "8gb", "--gpu-memory", "8GiB"],
                        env=env, cwd=ROOT, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["interpolation"]["VLKIT_HF_CACHE"] == str(cache)  # what compose mounts
    assert not (tmp_path / "home" / ".cache" / "huggingface").exists()


@pytest.mark.docker  # the compose CLI
@pytest.mark.parametrize("variables, expected", CASES)
def test_compose_default_mount_is_the_same_folder(variables, expected):
    """A plain `docker compose up` (no vlkit) mounts what hub_cache() names, for both profiles."""
    from tests.docker_helpers import require_compose
    from scripts.stack import compose as cp

    require_compose()
    env = _env("/home/u", **variables)
    for profile, service in cp.SERVICES.items():
        res = subprocess.run(["docker", "compose", "-f", str(cp.COMPOSE_FILE), "--profile", profile, "config",
                              "--format", "json"], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        volumes = json.loads(res.stdout)["services"][service]["volumes"]
        (hub,) = [v["source"] for v in volumes if v["target"] == "/cache/huggingface/hub"]
        assert hub == expected == _resolved(env)
