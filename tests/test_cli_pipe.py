"""`vlkit ... | head -1`: a reader that stops early ends vlkit quietly (no BrokenPipeError traceback,
no "Exception ignored" from the exit's flush), with exit status 1 as in Python's recipe (and rich's)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.docker_helpers import ROOT


@pytest.mark.parametrize("argv", [
    ["up", "--dry-run", "--gpu-memory", "8GiB"],   # prints line by line
    ["plan", "--gpu-memory", "8GiB", "--json"],    # one print, left in the buffer until the exit's flush
    ["plan", "--gpu-memory", "8GiB"],              # rich's console, which follows the recipe itself
])
def test_a_reader_that_closed_its_end_ends_vlkit_quietly(argv, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before vlkit writes: every write to it fails, not only a late one
    try:
        res = subprocess.run([sys.executable, "-m", "scripts", *argv], cwd=ROOT, stdout=write_end,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    finally:
        os.close(write_end)
    assert res.stderr == "" and res.returncode == 1, res.stderr


def test_output_to_a_reader_that_reads_it_all_is_unchanged():
    res = subprocess.run([sys.executable, "-m", "scripts", "plan", "--gpu-memory", "8GiB", "--json"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.lstrip().startswith("{"), res.stderr
