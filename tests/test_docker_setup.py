"""`make test` sets up Docker only when a selected test needs it (tests/docker_setup.py): so
`make test ARGS='-m "not docker"'` installs and starts no engine. The setup command is swapped for
one that leaves a mark, and pytest runs for real on two selections."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.docker_helpers import ROOT


def _pytest(tmp_path, *selection: str) -> bool:
    mark = tmp_path / "docker-setup-ran"
    env = {**os.environ, "VLKIT_TEST_SETUP": "1", "VLKIT_TEST_DOCKER_SETUP": f"touch '{mark}'"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], cwd=ROOT,
                   env=env, capture_output=True, text=True, timeout=300)
    return mark.exists()


def test_no_docker_setup_when_docker_tests_are_deselected(tmp_path):
    assert not _pytest(tmp_path, "-m", "not docker", "tests/test_usage.py", "tests/test_docker_compose.py")


def test_docker_setup_runs_first_when_a_docker_test_is_selected(tmp_path):
    assert _pytest(tmp_path, "tests/test_docker_compose.py::test_vllm_profile_has_shared_memory_for_its_workers")
