"""`vlkit k8s` as a user runs it: refusals write nothing, bad input is one clear line, rewrites keep
what was there (a changed file is backed up, an unchanged one is not touched)."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from scripts.cli import main
from scripts.planner import plan_for
from tests.docker_helpers import ROOT

GIB = 1024**3


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(["k8s", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_plan_that_does_not_fit_exits_3_with_the_planners_refusal_and_writes_nothing(capsys, tmp_path):
    model = "Qwen/Qwen3-VL-8B-Instruct"
    plan = plan_for(model=model, profile="16gb", gpu_memory_bytes=8 * GIB)
    assert not plan.fits and plan.refusal
    out_dir = tmp_path / "k8s"
    rc, out, err = run(capsys, "--model", model, "--gpu-memory", "8GiB", "--output", str(out_dir))
    assert rc == 3
    assert plan.refusal in err and "nothing was written" in err
    assert out == "" and not out_dir.exists()
    rc, out, err = run(capsys, "--model", model, "--gpu-memory", "8GiB")
    assert rc == 3 and out == ""  # nothing on stdout either: `| kubectl apply -f -` applies nothing


def test_a_context_beyond_the_card_is_refused_the_same_way(capsys):
    model = "Qwen/Qwen3-VL-4B-Instruct"
    plan = plan_for(model=model, profile="16gb", gpu_memory_bytes=16 * GIB, context=200000)
    rc, out, err = run(capsys, "--gpu-memory", "16GiB", "--model", model, "--context", "200000")
    assert rc == 3 and out == "" and plan.refusal in err and "a shorter context: --context" in err


@pytest.mark.parametrize("args, says", [
    (["--gpu-memory", "24GiB", "--gpus", "3"], "cannot split"),               # 32 heads over 3 GPUs
    (["--gpu-memory", "24GiB", "--model", "Nobody/NotAModel"], "unknown model"),
    (["--gpu-memory", "80GiB", "--model", "Qwen/Qwen3-VL-8B-Instruct", "--cache-size", "10Gi"], "cannot hold"),
])
def test_bad_input_exits_1_with_one_line(capsys, tmp_path, args, says):
    rc, out, err = run(capsys, *args, "--output", str(tmp_path / "k8s"))
    assert rc == 1 and says in err and out == ""
    assert not (tmp_path / "k8s").exists()


@pytest.mark.parametrize("args, says", [
    (["--name", "9lives"], "starting with a letter"),
    (["--name", "x" * 53], "at most 52"),
    (["--namespace", "Vision"], "namespace"),
    (["--node-selector", "nvidia.com/gpu.product"], "KEY=VALUE"),
    (["--node-selector", "pool=a b"], "the value"),
    (["--api-key-secret", "My_Key"], "secret name"),
    (["--cache-size", "lots"], "not a volume size"),
    (["--cache-size", "100Mi"], "not a volume size"),
    (["--gpus", "0"], "at least 1"),
    (["--replicas", "two"], "not a whole number"), (["--context", "8"], "at least 16"),
    ([], "--gpu-memory"),
])
def test_argument_errors_name_the_rule(capsys, args, says):
    rc, out, err = run(capsys, *(["--gpu-memory", "24GiB"] if args else []), *args)
    assert rc == 2 and says in err and out == ""  # argparse's status: not the 3 of a plan that does not fit


def test_a_local_model_directory_is_refused(capsys, tiny_model_dir):
    rc, out, err = run(capsys, "--gpu-memory", "24GiB", "--model", str(tiny_model_dir))
    assert rc == 1 and "hub id" in err and out == ""


def test_output_that_is_a_file_is_refused_and_left_alone(capsys, tmp_path):
    target = tmp_path / "manifests.yaml"
    target.write_text("mine\n")
    rc, _, err = run(capsys, "--gpu-memory", "24GiB", "--output", str(target))
    assert rc == 1 and "is a file" in err and target.read_text() == "mine\n"


def test_rewriting_backs_up_what_changed_and_leaves_the_rest(capsys, tmp_path):
    out_dir = tmp_path / "deploy" / "k8s"
    assert run(capsys, "--gpu-memory", "24GiB", "--output", str(out_dir))[0] == 0
    sts, svc = out_dir / "statefulset.yaml", out_dir / "service.yaml"
    edited = sts.read_text().replace("replicas: 1", "replicas: 5")
    sts.write_text(edited)
    svc_stat = svc.stat()
    rc, _, err = run(capsys, "--gpu-memory", "24GiB", "--output", str(out_dir))
    assert rc == 0 and "unchanged" in err
    backups = list(out_dir.glob("statefulset.yaml.vlkit-*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == edited
    assert "replicas: 1" in sts.read_text()
    assert svc.stat().st_mtime_ns == svc_stat.st_mtime_ns  # not rewritten
    # `kubectl apply -f DIR` reads .yaml/.yml/.json only: the backup is not applied with the rest.
    assert {p.suffix for p in out_dir.iterdir()} == {".yaml", ".bak"}


def test_make_k8s_passes_the_variables_to_the_cli():
    res = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-n", "k8s", "GPU_MEMORY=24GiB", "GPUS=2",
                          "MODEL=Qwen/Qwen3-VL-4B-Instruct", "CONTEXT=16384", "ARGS=--output deploy/k8s"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = " ".join(shlex.split(next(l for l in res.stdout.splitlines() if "vlkit k8s" in l)))
    for part in ("--gpu-memory=24GiB", "--gpus=2", "--model=Qwen/Qwen3-VL-4B-Instruct", "--context=16384",
                 "--output deploy/k8s"):
        assert part in line
    usage = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "k8s"], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage: make k8s GPU_MEMORY=" in usage.stdout



def test_make_k8s_refuses_the_8gb_profile_instead_of_ignoring_it():
    """The manifests run vLLM: PROFILE=8gb asked for something else, so it is said, not dropped."""
    res = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "k8s", "PROFILE=8gb", "GPU_MEMORY=24GiB"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "PROFILE=8gb is not for Kubernetes" in res.stderr and not res.stdout


def test_a_refusal_offers_only_next_steps_kubernetes_can_take(capsys):
    """The manifests run vLLM: the planner's other profile (vlkit's own service) is no next step here."""
    rc, out, err = run(capsys, "--gpu-memory", "8GiB", "--model", "Qwen/Qwen3-VL-4B-Instruct")
    assert rc == 3 and out == ""
    assert "--profile 8gb" not in err and "8gb profile" not in err
    assert "--model Qwen/Qwen3-VL-4B-Instruct-FP8 (profile 16gb" in err


def test_an_output_folder_holding_a_fifo_is_refused_before_anything_is_written(capsys, tmp_path):
    out_dir = tmp_path / "k8s"
    out_dir.mkdir()
    os.mkfifo(out_dir / "statefulset.yaml")  # read as a file, it would block for ever
    rc, _, err = run(capsys, "--gpu-memory", "24GiB", "--output", str(out_dir))
    assert rc == 1 and "not a regular file" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["statefulset.yaml"]  # service.yaml not written either


@pytest.mark.parametrize(("args", "says"), [
    (["--output", ""], "--output is empty"),  # Path("") would be the current folder
    (["--no-download", "--hf-token-secret", "hf-token"], "nothing reads it"),
])
def test_options_that_would_do_something_else_than_asked_are_refused(capsys, tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "--gpu-memory", "24GiB", *args)
    assert rc == 1 and says in err and out == "" and list(tmp_path.iterdir()) == []


def test_the_apply_hint_for_a_folder_with_spaces_can_be_pasted(capsys, tmp_path):
    out_dir = tmp_path / "my manifests"
    rc, _, err = run(capsys, "--gpu-memory", "24GiB", "--output", str(out_dir))
    assert rc == 0 and f"apply with: kubectl apply -f '{out_dir}'" in err
