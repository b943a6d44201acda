"""What `make up`, `plan`, `build` and `bench` say at once, before anything slow, on a machine that
cannot run them: no GPU (this one), a model folder the container cannot read, a folder that is not
there. One line each, in make's terms."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from scripts.stack import preflight
from scripts.stack.preflight import model_folder_problem
from tests.docker_helpers import ROOT


def _make(*args: str, env=None) -> subprocess.CompletedProcess:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def _vlkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def no_gpu():
    from scripts.gpu import probe

    if probe().gpus:
        pytest.skip("this machine has an NVIDIA GPU")


def _vlkit_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [l for l in (res.stdout + res.stderr).splitlines() if l.startswith("vlkit")]


@pytest.mark.parametrize("make_vars", [[], ["GPU_MEMORY=8GiB"], ["PROFILE=8gb", "MODEL=Qwen/Qwen3-VL-4B-Instruct"]])
def test_up_without_a_gpu_says_so_at_once_and_points_at_doctor_and_cpu_mode(no_gpu, make_vars, tmp_path):
    env = {**os.environ, "VLKIT_UP_ENV_FILE": str(tmp_path / "vlkit.env"), "VLKIT_OVERRIDE_FILE": str(tmp_path / "o.yaml")}
    res = _make("up", *make_vars, env=env)
    assert res.returncode != 0
    (line,) = _vlkit_lines(res)
    assert "no NVIDIA GPU answers here" in line
    model = "".join(f"{v} " for v in make_vars if v.startswith("MODEL="))  # the user's model stays in the hint
    assert "`make doctor`" in line and f"`make up PROFILE=8gb {model}ARGS=--cpu`" in line
    assert "--gpu-memory" not in line and "health" not in line
    assert not (tmp_path / "vlkit.env").exists()


def test_plan_without_a_gpu_names_the_make_variable(no_gpu):
    res = _make("plan")
    (line,) = _vlkit_lines(res)
    assert "`make plan GPU_MEMORY=8GiB`" in line and "--gpu-memory" not in line
    plain = _vlkit("plan")  # the same, for someone who runs vlkit itself
    assert "`vlkit plan --gpu-memory 8GiB`" in plain.stderr


def test_build_auto_without_a_gpu_asks_for_the_profile(no_gpu):
    res = _make("build")
    if "docker is not installed" in res.stderr or "daemon does not answer" in res.stderr:
        pytest.skip("build checks Docker first")
    (line,) = _vlkit_lines(res)
    assert "`make build PROFILE=8gb`" in line and "GPU_MEMORY=8GiB" in line


def test_bench_without_a_gpu_refuses_at_once(no_gpu):
    res = _make("bench")
    assert res.returncode != 0
    (line,) = _vlkit_lines(res)
    assert "`make bench` measures a GPU" in line and "`make bench ARGS=--smoke`" in line
    assert "[bench]" not in res.stdout + res.stderr  # nothing was built or measured


def test_bench_help_still_runs_without_a_gpu(no_gpu):
    pytest.importorskip("torch")
    res = _vlkit("bench", "--help")
    assert res.returncode == 0 and "--smoke" in res.stdout


@pytest.fixture
def saved_model(tiny_model_dir, tmp_path):
    """A model folder as save_pretrained leaves it: model.safetensors is 0600."""
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    folder.chmod(0o755)
    for p in folder.iterdir():
        p.chmod(0o644)
    (folder / "model.safetensors").chmod(0o600)
    return folder


def _up_cpu_dry_run(model) -> subprocess.CompletedProcess:
    return _vlkit("up", "--cpu", "--profile", "8gb", "--model", str(model), "--dry-run")


def test_a_folder_the_container_user_cannot_read_is_refused_with_the_chmod(saved_model):
    res = _up_cpu_dry_run(saved_model)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cannot read model.safetensors (-rw-------)" in res.stderr
    assert f"`chmod -R a+rX {saved_model}`" in res.stderr and "uid 10001" in res.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(saved_model)], check=True)  # the fix it names
    assert _up_cpu_dry_run(saved_model).returncode == 0


def test_a_folder_linking_outside_itself_is_refused(saved_model, tmp_path):
    subprocess.run(["chmod", "-R", "a+rX", str(saved_model)], check=True)
    outside = tmp_path / "blobs"
    outside.mkdir()
    (saved_model / "config.json").rename(outside / "config.json")
    (saved_model / "config.json").symlink_to(outside / "config.json")
    assert "links outside the folder" in model_folder_problem(saved_model)


def test_not_a_model_folder_and_no_such_folder(tmp_path):
    assert "not a model folder (no config.json" in model_folder_problem(tmp_path)
    res = _vlkit("up", "--cpu", "--model", str(tmp_path / "nope"), "--dry-run")
    assert res.returncode == 2 and "no such folder" in res.stderr


def test_docker_without_an_nvidia_runtime_is_refused_before_download_and_build():
    from tests.doctor_helpers import DATA

    engine = (DATA / "docker" / "info-engine-debian.json").read_text()  # a real engine's info: runc only
    problem = preflight.docker_gpu_problem(engine)
    assert "Docker has no NVIDIA runtime" in problem and "nvidia-container-toolkit" in problem
    with_runtime = engine.replace('"Runtimes":{', '"Runtimes":{"nvidia":{"path":"nvidia-container-runtime"},', 1)
    assert with_runtime != engine and preflight.docker_gpu_problem(with_runtime) is None
