"""`make` (help, the default) lists every target and every variable with one line each, the thin
targets call the CLI, and what make prints on its own is what a newcomer needs (no silent venv)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from scripts.usage import MAKE_VARIABLES
from tests.conftest import free_port
from tests.docker_helpers import ROOT

ISSUE_TARGETS = {"help", "up", "down", "logs", "status", "doctor", "plan", "build", "test", "bench",
                 "wsl-config", "wsl-restart", "download", "caption", "clean", "k8s"}


def _make(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    return subprocess.run(["make", "--no-print-directory", "-C", str(cwd), *args], capture_output=True, text=True,
                          env=env)


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.M))


def _makefile_variables() -> set[str]:
    return set(re.findall(r"^([A-Z_]+) =.*#: ", (ROOT / "Makefile").read_text(), re.M))


def _help_sections() -> dict[str, list[str]]:
    res = _make()
    assert res.returncode == 0, res.stderr
    sections: dict[str, list[str]] = {}
    current = None
    for line in res.stdout.splitlines()[1:]:
        if not line.startswith(" "):
            current = line.split()[0].rstrip(":")
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def test_default_goal_is_help_and_lists_every_target_with_a_description():
    targets = _help_sections()["targets"]
    listed = {line.split()[0] for line in targets}
    assert ISSUE_TARGETS <= listed
    assert _makefile_targets() == listed  # nothing undocumented, nothing listed that is not there
    for line in targets:
        assert len(line.split(None, 1)) == 2, f"target without a description: {line!r}"


def test_help_lists_every_variable_and_says_they_are_not_flags():
    variables = _help_sections()["variables"]
    listed = {line.split()[0] for line in variables}
    assert {"GPU_MEMORY", "CONTEXT", "PROFILE", "MODEL", "PORT", "IMG", "ARGS"} <= listed
    assert _makefile_variables() == listed
    # Every make variable a message may name (scripts/usage.py) is one the Makefile has.
    assert set(MAKE_VARIABLES.values()) <= _makefile_variables()
    assert "GPU_MEMORY=8GiB, not --gpu-memory" in _make().stdout


def test_variables_reach_the_cli():
    def words(res, command):  # the vlkit command line make runs, as the shell splits it
        return " ".join(shlex.split([l for l in res.stdout.splitlines() if command in l][0]))

    res = _make("-n", "up", "PROFILE=16gb", "MODEL=Qwen/Qwen3-VL-4B-Instruct-FP8", "GPU_MEMORY=16GiB", "PORT=8011",
                "CONTEXT=4096")
    assert res.returncode == 0, res.stderr
    line = words(res, "vlkit up")
    assert "--profile=16gb" in line and "--model=Qwen/Qwen3-VL-4B-Instruct-FP8" in line
    assert "--gpu-memory=16GiB" in line and "--port=8011" in line and "--context=4096" in line
    build = words(_make("-n", "build", "GPU_MEMORY=8GiB"), "vlkit build")
    assert "--gpu-memory=8GiB" in build  # PROFILE=auto picks the profile for that card
    plan = words(_make("-n", "plan", "GPU_MEMORY=24GiB", "GPUS=2"), "vlkit plan")
    assert "--gpus=2" in plan  # the card count k8s plans for is the one `make plan` shows
    assert "--port=8011" in words(_make("-n", "doctor", "PORT=8011"), "vlkit doctor")  # the port up would use
    # A value that starts with - stays the flag's value; an empty one leaves the flag out (the CLI's default).
    assert "--gpu-memory=-8GiB" in words(_make("-n", "plan", "GPU_MEMORY=-8GiB"), "vlkit plan")
    assert "--profile" not in words(_make("-n", "plan", "PROFILE="), "vlkit plan")


def test_variables_exported_in_the_shell_do_not_steer_make():
    """A PORT or MODEL exported for something else (a web app's PORT=3000) is not make's: only the
    command line sets make's variables (and `make -e`, asked for)."""
    env = {**os.environ, "PORT": "3000", "MODEL": "someone/else", "PROFILE": "16gb", "ARGS": "--cpu", "GPU_MEMORY": "1GiB"}
    res = _make("-n", "up", env=env)
    assert res.returncode == 0, res.stderr
    line = [l for l in res.stdout.splitlines() if "vlkit up" in l][0]
    assert "--profile='auto'" in line
    assert not any(word in line for word in ("3000", "someone/else", "--cpu", "1GiB")), line
    line = [l for l in _make("-n", "up", "PORT=3000", env=env).stdout.splitlines() if "vlkit up" in l][0]
    assert "--port='3000'" in line  # the command line still does


def test_a_gpu_count_is_named_as_the_make_variable_it_came_from():
    """16 attention heads do not split over 3 GPUs: the refusal names GPUS=3, as the user typed it."""
    for target in ("plan", "k8s"):
        res = _make(target, "GPU_MEMORY=24GiB", "GPUS=3", "PROFILE=16gb")
        assert res.returncode != 0 and "GPUS=3: vLLM cannot split" in res.stderr, res.stdout + res.stderr


def test_download_and_caption_say_what_they_need_in_make_terms():
    download = _make("download")
    assert download.returncode != 0 and "make download MODEL=" in download.stderr
    caption = _make("caption")
    assert caption.returncode != 0 and "make caption IMG=" in caption.stderr


def test_first_target_says_it_is_making_the_venv(tmp_path):
    """A fresh checkout: the first target prints what it does before pip runs silently for half a minute."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info"))
    # python3 -m venv fails fast here: a PATH whose python3 cannot make a venv shows the fix, first.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 'Error: ensurepip is not available' >&2\nexit 1\n")
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    res = _make("plan", "ARGS=--json", cwd=checkout, env=env)
    assert res.returncode != 0
    assert res.stderr.index("first run: installing the host tools") < res.stderr.index("install python3-venv")
    assert res.stdout == ""  # stdout is the command's own: `make plan ARGS=--json | jq` on a first run


def test_a_value_with_spaces_reaches_the_cli_as_one_word(tmp_path, tiny_model_dir):
    """Windows folders have spaces (/mnt/c/Users/Jane Doe/...): MODEL= and IMG= stay one argument,
    as the messages that say `make caption IMG='my photo.jpg'` promise."""
    folder = tmp_path / "my models" / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    up = _make("up", "PROFILE=8gb", f"MODEL={folder}", "ARGS=--cpu --dry-run")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"source: {folder}" in up.stdout
    photo = tmp_path / "my photo.jpg"
    photo.write_bytes(b"not read: nothing answers on the port")
    caption = _make("caption", f"IMG={photo}", f"PORT={free_port()}")
    assert "no such image" not in caption.stderr and "no vlkit service answers" in caption.stderr, caption.stderr


@pytest.mark.parametrize("variables, named, why", [
    (["PROFILE=16"], "PROFILE", "invalid choice: '16'"),
    (["GPU_MEMORY=8XB"], "GPU_MEMORY", "not a memory size: '8XB'"),
    (["GPU_MEMORY=8GiB", "CONTEXT=lots"], "CONTEXT", "not a number of tokens"),
    (["GPU_MEMORY=8GiB", "GPUS=0"], "GPUS", "must be at least 1"),
])
def test_a_bad_variable_is_one_line_naming_the_variable(variables, named, why):
    """`make plan PROFILE=16` is told PROFILE, not --profile, and no usage text of flags never typed."""
    res = _make("plan", *variables)
    assert res.returncode != 0
    # make's own "make: *** ... Error 2" ("make[1]:" when CI's `make test` runs this make) is not ours.
    lines = [line for line in res.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert lines == [lines[0]] and f"vlkit plan: {named}: " in lines[0] and why in lines[0], res.stderr
    assert "--" not in lines[0] and "usage:" not in res.stderr


def test_a_bad_flag_in_args_is_named_as_args():
    res = _make("up", "ARGS=--timeout 0")
    assert res.returncode != 0 and "vlkit up: ARGS=--timeout: must be at least 1" in res.stderr, res.stderr
    unknown = _make("plan", "ARGS=--vram 8GiB")
    assert unknown.returncode != 0 and "unrecognized arguments: --vram 8GiB (from ARGS" in unknown.stderr


def test_a_misspelt_flag_is_told_the_one_it_resembles():
    """`ARGS=--cpuu`, `ARGS='--contxt 4096'`: the refusal names the flag meant, in make's words
    (a flag that is a make variable is told as the variable)."""
    cpu = _make("up", "ARGS=--cpuu --dry-run")
    assert cpu.returncode != 0 and "unrecognized arguments: --cpuu; did you mean ARGS=--cpu?" in cpu.stderr, cpu.stderr
    context = _make("plan", "ARGS=--contxt 4096")
    assert "unrecognized arguments: --contxt 4096; did you mean CONTEXT=?" in context.stderr, context.stderr
    direct = subprocess.run([sys.executable, "-m", "scripts", "wsl", "config", "--dryrun"], cwd=ROOT,
                            capture_output=True, text=True)  # not through make: the flag itself
    assert direct.returncode == 2, direct.stderr
    assert "unrecognized arguments: --dryrun; did you mean --dry-run?" in direct.stderr, direct.stderr


def test_more_gpus_than_this_machine_has_says_how_to_plan_for_them(tmp_path):
    """One H100 here (its recorded nvidia-smi), GPUS=2: the fix plans two such cards by their size."""
    from tests.doctor_helpers import h100_smi

    h100_smi(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    res = _make("plan", "GPUS=2", env=env)
    assert res.returncode != 0
    assert "GPUS=2, but 1 GPU(s) found here" in res.stderr and "GPUS=2 GPU_MEMORY=80GiB" in res.stderr, res.stderr
    again = _make("plan", "GPUS=2", "GPU_MEMORY=80GiB", "ARGS=--json", env=env)
    assert again.returncode == 0, again.stderr


def test_help_says_the_status_of_a_plan_that_does_not_fit():
    from scripts.planner.cli import EXIT_DOES_NOT_FIT

    plan = next(line for line in _help_sections()["targets"] if line.split()[0] == "plan")
    assert f"exit {EXIT_DOES_NOT_FIT}: it does not fit" in plan
