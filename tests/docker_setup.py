"""A pytest plugin (tests/conftest.py loads it): under `make test` (VLKIT_TEST_SETUP=1), Docker, compose
and the base image are set up once, before the first test, and only when a selected test needs them
(the `docker` marker). So `make test ARGS='-m "not docker"'` installs and starts no Docker engine."""
from __future__ import annotations

import os
import subprocess

from tests.docker_helpers import ROOT


# VLKIT_TEST_DOCKER_SETUP: another command, for the test of this plugin itself.
SETUP_COMMAND = os.environ.get("VLKIT_TEST_DOCKER_SETUP") or f"bash '{ROOT / 'scripts' / 'setup-test-env.sh'}' docker"


def needs_docker(items) -> bool:
    return any(item.get_closest_marker("docker") for item in items)


def pytest_collection_finish(session) -> None:
    if os.environ.get("VLKIT_TEST_SETUP") != "1" or session.config.option.collectonly:
        return
    if not needs_docker(session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # its steps show live: apt, dockerd, the base image
        print("\n== Docker tests selected: setting up Docker (scripts/setup-test-env.sh docker)", flush=True)
        code = subprocess.call(SETUP_COMMAND, shell=True)
        if code:
            print(f"== Docker setup failed (exit {code}): the Docker tests will say why", flush=True)
