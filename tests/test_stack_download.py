"""`make download` when it cannot download: one line that says what happened and what to do.
The hub is "unreachable" through HF_ENDPOINT pointing at a closed port on 127.0.0.1 (no traffic leaves)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import free_port
from tests.docker_helpers import ROOT

MODEL = "Qwen/Qwen3-VL-2B-Instruct"


def _download(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    full.update(VLKIT_HF_CACHE=str(tmp_path / "hub"), VLKIT_VIA_MAKE="1", **env)
    return subprocess.run([sys.executable, "-m", "scripts", "download", *args], cwd=ROOT, capture_output=True,
                          text=True, env=full, timeout=120)


def test_offline_is_one_clear_line(tmp_path):
    res = _download(tmp_path, MODEL, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_ETAG_TIMEOUT="2")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    (line,) = lines
    assert line.startswith(f"vlkit: cannot download {MODEL}: the Hugging Face hub does not answer (offline?)")
    assert f"not in the cache {tmp_path / 'hub'}" in line
    assert f"`make download MODEL={MODEL}` again" in line and "MODEL=/path/to/folder" in line
    assert "revision on" not in line and "Error" not in line


def test_offline_mode_is_named(tmp_path):
    res = _download(tmp_path, MODEL, HF_HUB_OFFLINE="1")
    assert res.returncode == 1 and "HF_HUB_OFFLINE=1 is set" in res.stderr


def test_not_a_hub_id(tmp_path):
    res = _download(tmp_path, "not a model!")
    assert res.returncode == 1 and "neither a model folder here nor a hub id" in res.stderr


def test_a_model_folder_is_not_said_to_be_in_the_cache(tmp_path, tiny_model_dir):
    """`make download MODEL=/my/folder`: nothing is downloaded, and the cache is not where it is."""
    res = _download(tmp_path, str(tiny_model_dir))
    assert res.returncode == 0, res.stderr
    assert "shared cache" not in res.stdout and not (tmp_path / "hub").exists()
    assert f"{tiny_model_dir} is a model folder: nothing to download" in res.stdout
    assert f"`make up MODEL={tiny_model_dir}` serves it" in res.stdout
