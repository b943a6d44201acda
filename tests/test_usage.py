"""scripts/usage.py: messages name a setting the way the user gives it (make variable or flag)."""
from __future__ import annotations

import pytest

from scripts.usage import command, setting


@pytest.fixture
def via_make(monkeypatch):
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.delenv("VLKIT_VIA_MAKE", raising=False)


def test_make_users_are_told_make_variables(via_make):
    assert setting("gpu_memory", "8GiB") == "GPU_MEMORY=8GiB"
    assert setting("model") == "MODEL"
    assert setting("timeout", 600) == "ARGS='--timeout 600'"   # no variable of its own: through ARGS
    assert setting("cpu", True) == "ARGS=--cpu"
    assert command("up", model="Qwen/Qwen3-VL-2B-Instruct") == "make up MODEL=Qwen/Qwen3-VL-2B-Instruct"
    assert command("up", profile="8gb", cpu=True) == "make up PROFILE=8gb ARGS=--cpu"
    assert command("doctor", gpu_container=True) == "make doctor ARGS=--gpu-container"
    assert command("wsl-config", dry_run=True) == "make wsl-config ARGS=--dry-run"
    assert command("caption", image="my photo.jpg") == "make caption IMG='my photo.jpg'"


def test_direct_users_are_told_flags(direct):
    assert setting("gpu_memory", "8GiB") == "--gpu-memory 8GiB"
    assert setting("cpu", True) == "--cpu"
    assert command("up", profile="8gb", cpu=True) == "vlkit up --profile 8gb --cpu"
    assert command("wsl-config", dry_run=True) == "vlkit wsl config --dry-run"
    assert command("download", model="Qwen/Qwen3-VL-2B-Instruct") == "vlkit download --model Qwen/Qwen3-VL-2B-Instruct"
