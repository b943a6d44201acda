"""The plan options are declared once (scripts/planner/options.py): plan, up, build and doctor take the
same flags with the same types and limits, and bad values are refused before anything runs."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from scripts.cli import build_parser
from scripts.planner import options
from tests.docker_helpers import ROOT

GIB = 1024 ** 3
BAD = [
    ("--context", "0", "must be at least 16"),
    ("--context", "many", "not a number of tokens"),
    ("--context", "2.5K", "no decimals with the binary K"),
    ("--gpu-memory-utilization", "5", "must be in (0, 1]"),
    ("--gpu-memory-utilization", "0", "must be in (0, 1]"),
    ("--gpu-memory", "8XB", "not a memory size"),
    ("--gpu-memory", "100MiB", "under 0.5 GiB"),
    ("--gpu-memory", "8188", "for MiB (as nvidia-smi shows it) write 8188MiB"),  # pasted from nvidia-smi
]


def _vlkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("command", ["plan", "up"])
@pytest.mark.parametrize("flag, value, why", BAD)
def test_bad_plan_inputs_are_refused_by_argparse(command, flag, value, why):
    res = _vlkit(command, flag, value, "--dry-run" if command == "up" else "--json")
    assert res.returncode == 2
    assert f"argument {flag}: " in res.stderr and why in res.stderr


@pytest.mark.parametrize("command, extra", [("build", []), ("up", ["--dry-run"])])
def test_build_and_up_refuse_a_context_of_zero_too(command, extra):
    res = _vlkit(command, "--context", "0", *extra)
    assert res.returncode == 2 and "must be at least 16" in res.stderr


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_ports_are_checked(port):
    res = _vlkit("up", "--port", port, "--dry-run")
    assert res.returncode == 2 and "argument --port" in res.stderr


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _declared(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    return {a.dest: (tuple(a.option_strings), a.type, a.help, a.metavar)
            for a in parser._actions if a.dest in options._OPTIONS}


def test_every_command_declares_the_same_options_alike():
    plan = _declared(_subparser("plan"))
    assert set(plan) == set(options._OPTIONS)
    for command in ("up", "build", "doctor", "health"):
        for dest, declared in _declared(_subparser(command)).items():
            assert declared == plan[dest], (command, dest)


def test_plan_kwargs_are_what_plan_for_takes():
    args = _subparser("plan").parse_args(["--model", "Qwen/Qwen3-VL-4B-Instruct-FP8", "--gpu-memory", "16GiB",
                                          "--context", "4096", "--gpu-memory-utilization", "0.8", "--profile", "16gb"])
    assert options.plan_kwargs(args) == {
        "profile": "16gb", "model": "Qwen/Qwen3-VL-4B-Instruct-FP8", "context": 4096,
        "gpu_memory_bytes": 16 * GIB, "gpu_memory_utilization": 0.8, "gpu_count": 1}
    from scripts.planner import plan_for

    assert plan_for(**options.plan_kwargs(args)).profile == "16gb"


def test_the_default_model_is_vlkit_model_else_the_service_default(monkeypatch):
    from service.settings import ServiceSettings

    monkeypatch.delenv("VLKIT_MODEL", raising=False)
    assert options.default_model() == ServiceSettings.model_fields["model"].default
    monkeypatch.setenv("VLKIT_MODEL", "Qwen/Qwen3-VL-4B-Instruct")
    args = _subparser("plan").parse_args(["--gpu-memory", "8GiB"])
    assert options.plan_kwargs(args)["model"] == "Qwen/Qwen3-VL-4B-Instruct"


@pytest.mark.parametrize("text, tokens", [("4096", 4096), ("4k", 4000), ("4K", 4096), ("25.6k", 25600),
                                          ("1M", 2**20), (" 8K ", 8192)])
def test_a_context_is_read_as_vllms_max_model_len_reads_it(text, tokens):
    """CONTEXT=4k as `vllm serve --max-model-len 4k` takes it: k is 1000, K is 1024."""
    assert options.context_tokens(text) == tokens
    args = build_parser().parse_args(["plan", "--context", text])
    assert args.context == tokens


@pytest.mark.parametrize("command", ["plan", "up", "build", "doctor", "health"])
def test_a_profile_in_capitals_is_the_profile(command):
    """PROFILE=8GB, as the card is sold, is the 8gb profile, not an invalid choice."""
    assert build_parser().parse_args([command, "--profile", "8GB"]).profile == "8gb"
    assert build_parser().parse_args([command, "--profile", "16Gb"]).profile == "16gb"
