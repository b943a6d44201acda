"""Instructor against the real service on the tiny model: its default mode (a forced tool call) and
its JSON_SCHEMA mode each return a valid model. Instructor runs in its own venv (its pins cannot
coexist with the project's: tests/requirements-instructor.txt), so the client is a script there."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.clients.pet import Pet
from tests.conftest import API_KEY, SERVED_NAME

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "clients" / "instructor_client.py"


def instructor_python() -> Path:
    python = Path(os.environ.get("VLKIT_INSTRUCTOR_VENV", ROOT / ".venv-instructor")) / "bin" / "python"
    if not python.exists():
        # CI makes it (scripts/setup-test-env.sh): there a missing venv is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no instructor venv at {python.parent.parent}: python3 -m venv .venv-instructor && "
            ".venv-instructor/bin/pip install -r tests/requirements-instructor.txt")
    return python


def test_default_and_json_schema_modes_return_the_model(long_context_server):
    done = subprocess.run([str(instructor_python()), str(SCRIPT), long_context_server.base_url + "/v1", API_KEY,
                           SERVED_NAME], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["mode"] for r in results] == ["tool_call", "json_schema_mode"]
    for result in results:  # validated by instructor there, again here
        Pet.model_validate(result["pet"])
    assert [r["finish_reason"] for r in results] == ["stop", "stop"]  # a named tool: "stop", as OpenAI says
