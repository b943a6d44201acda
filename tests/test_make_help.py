"""`make` (help, the default) lists every target with one line each, and the thin targets call the CLI."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.docker_helpers import ROOT

ISSUE_TARGETS = {"help", "up", "down", "logs", "status", "doctor", "plan", "build", "test", "bench",
                 "wsl-config", "wsl-restart", "download", "caption", "clean", "k8s"}


def _make(*args: str) -> subprocess.CompletedProcess:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True)


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.M))


def test_default_goal_is_help_and_lists_every_target():
    res = _make()
    assert res.returncode == 0, res.stderr
    listed = {m.group(1) for m in re.finditer(r"^  ([a-z][a-z0-9-]*)\s+\S", res.stdout, re.M)}
    assert ISSUE_TARGETS <= listed
    assert _makefile_targets() == listed  # nothing undocumented, nothing listed that is not there
    for line in res.stdout.splitlines()[1:]:
        assert len(line.split(None, 1)) == 2, f"target without a description: {line!r}"


def test_variables_reach_the_cli():
    res = _make("-n", "up", "PROFILE=16gb", "MODEL=Qwen/Qwen3-VL-4B-Instruct-FP8", "GPU_MEMORY=16GiB", "PORT=8011")
    assert res.returncode == 0, res.stderr
    line = [l for l in res.stdout.splitlines() if "vlkit up" in l][0]
    assert "--profile 16gb" in line and "--model Qwen/Qwen3-VL-4B-Instruct-FP8" in line
    assert "--gpu-memory 16GiB" in line and "--port 8011" in line


def test_download_and_caption_say_what_they_need():
    assert "usage: make download MODEL=" in _make("download").stdout
    assert "usage: make caption IMG=" in _make("caption").stdout
