"""`vlkit up` without Docker: the dry run resolves to the planner's command, refusals stop early,
the generated files are what compose reads."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from scripts.safe_file import write_atomic
from scripts.stack import compose as cp
from tests.docker_helpers import ROOT

GIB = 1024 ** 3
FP8_4B = "Qwen/Qwen3-VL-4B-Instruct-FP8"


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "VLKIT_UP_ENV_FILE": str(tmp_path / "vlkit.env"),
            "VLKIT_OVERRIDE_FILE": str(tmp_path / "vlkit.compose.yaml"), "VLKIT_PROJECT": "vlkit-test"}


def _make_up(tmp_path, *make_vars: str) -> subprocess.CompletedProcess:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "up", *make_vars],
                          capture_output=True, text=True, env=_env(tmp_path))


def test_make_up_16gb_dry_run_resolves_to_the_planned_vllm_command(tmp_path):
    from scripts.planner import plan_for

    plan = plan_for(model=FP8_4B, profile="16gb", gpu_memory_bytes=16 * GIB)
    assert plan.fits and plan.profile == "16gb"
    res = _make_up(tmp_path, "PROFILE=16gb", f"MODEL={FP8_4B}", "GPU_MEMORY=16GiB", "ARGS=--dry-run --json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["profile"] == "16gb"
    assert out["container_command"] == ["vllm", "serve", FP8_4B, "--host", "0.0.0.0", "--port", "8000",
                                        "--served-model-name", FP8_4B, *plan.vllm_args]
    assert out["override"]["services"]["vllm-16gb"]["command"] == out["container_command"][2:]
    compose = out["compose"]
    assert compose[:2] == ["docker", "compose"] and compose[-4:] == ["up", "-d", "--no-build", "vllm-16gb"]
    assert compose[compose.index("--profile") + 1] == "16gb"
    assert str(tmp_path / "vlkit.compose.yaml") in compose  # the override carrying the planned command
    # A dry run writes nothing and starts nothing.
    assert not (tmp_path / "vlkit.env").exists() and not (tmp_path / "vlkit.compose.yaml").exists()


def test_text_dry_run_prints_the_compose_and_container_commands(tmp_path):
    from scripts.planner import plan_for

    plan = plan_for(model=FP8_4B, profile="16gb", gpu_memory_bytes=16 * GIB)
    res = _make_up(tmp_path, "PROFILE=16gb", f"MODEL={FP8_4B}", "GPU_MEMORY=16GiB", "ARGS=--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = {l.split(":", 1)[0]: l.split(":", 1)[1].strip() for l in res.stdout.splitlines() if ":" in l}
    assert shlex.split(lines["container command"])[-len(plan.vllm_args):] == plan.vllm_args
    compose = shlex.split(lines["compose"])
    assert compose[:2] == ["docker", "compose"] and "up" in compose


def test_up_refuses_a_plan_that_does_not_fit_before_touching_docker(tmp_path):
    res = subprocess.run([sys.executable, "-m", "scripts", "up", "--profile", "16gb", "--model",
                          "Qwen/Qwen3-VL-8B-Instruct", "--gpu-memory", "4GiB"],
                         capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "does not fit" in res.stderr
    # the planner's reason, then its next step, each said once (not 'next step: <the reason>. Next step: ...')
    assert res.stderr.lower().count("next step") == 1 and "\n  why: " in res.stderr, res.stderr
    assert not (tmp_path / "vlkit.env").exists()


@pytest.mark.parametrize(("flags", "said"), [
    (["--gpu-memory", "8GiB"], "does not fit this card in either profile (8gb, 16gb)"),  # auto tried both
    (["--gpu-memory", "8GiB", "--profile", "16gb"], "does not fit this card (16gb profile)"),
    (["--cpu", "--context", "100000"], "does not fit this card (8gb profile)"),  # CPU mode plans the 8gb one
])
def test_a_refusal_names_the_profiles_that_were_tried(tmp_path, flags, said):
    res = subprocess.run([sys.executable, "-m", "scripts", "up", "--model", "Qwen/Qwen3-VL-8B-Instruct", "--dry-run",
                          *flags], capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT)
    assert res.returncode == 2 and said in res.stderr, res.stderr


def test_a_refused_plan_points_at_the_same_plan(tmp_path):
    """`make plan` alone would plan another card (or none here): the budget to look at is this one."""
    res = _make_up(tmp_path, "PROFILE=8gb", "GPU_MEMORY=8GiB", "CONTEXT=100k", "ARGS=--dry-run")
    assert res.returncode != 0 and "does not fit" in res.stderr
    assert "`make plan PROFILE=8gb CONTEXT=100000 GPU_MEMORY=8GiB` shows the whole budget" in res.stderr, res.stderr
    again = subprocess.run(["make", "-s", "-C", str(ROOT), "plan", "PROFILE=8gb", "CONTEXT=100000", "GPU_MEMORY=8GiB"],
                           capture_output=True, text=True, env=_env(tmp_path))
    assert "largest context that fits" in again.stdout  # the same refusal, with its whole budget
    cpu = _make_up(tmp_path, "MODEL=Qwen/Qwen3-VL-8B-Instruct", "CONTEXT=100000", "ARGS=--cpu")
    assert "`make plan PROFILE=8gb MODEL=Qwen/Qwen3-VL-8B-Instruct CONTEXT=100000 GPU_MEMORY=8GiB`" in cpu.stderr


def test_cpu_mode_is_refused_for_vllm(tmp_path):
    res = subprocess.run([sys.executable, "-m", "scripts", "up", "--profile", "16gb", "--cpu", "--dry-run"],
                         capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT)
    assert res.returncode == 2 and "needs a GPU" in res.stderr


def test_env_file_is_written_whole_and_rejects_multiline_values(tmp_path):
    launch = cp.Launch(profile="8gb", model="Qwen/Qwen3-VL-2B-Instruct",
                       service_env={"VLKIT_MAX_PIXELS": "401408", "VLKIT_DTYPE": "bfloat16"})
    text = cp.render_env_file(launch.env_file_values(), "header line")
    target = tmp_path / "vlkit.env"
    assert cp.write_generated(target, text) is None
    lines = target.read_text().splitlines()
    assert lines[0] == "# header line" and lines[-1].startswith(cp.STAMP)
    assert "VLKIT_MAX_PIXELS='401408'" in lines and "VLKIT_MODEL='Qwen/Qwen3-VL-2B-Instruct'" in lines
    assert [p.name for p in tmp_path.iterdir()] == ["vlkit.env"]  # no temporary left behind
    target.chmod(0o640)
    assert cp.write_generated(target, text) is None  # as vlkit wrote it: replaced, no backup
    assert target.stat().st_mode & 0o777 == 0o640
    with pytest.raises(ValueError):
        cp.render_env_file({"VLKIT_API_KEY": "a\nVLKIT_HOST=0.0.0.0"}, "h")


def test_edits_to_the_generated_files_are_kept_in_a_backup(tmp_path):
    """Nothing of the user's is lost: a line added to vlkit.env, or a file there vlkit did not write,
    is kept beside it before `up` rewrites it (and before `clean` removes it)."""
    target = tmp_path / "vlkit.env"
    cp.write_generated(target, "# plan\nVLKIT_MAX_BATCH_SIZE='8'\n")
    edited = target.read_bytes() + b"VLKIT_LOG_LEVEL=debug  # mine\n"
    target.write_bytes(edited)
    backup = cp.write_generated(target, "# plan\nVLKIT_MAX_BATCH_SIZE='4'\n")
    assert backup is not None and backup.read_bytes() == edited and "VLKIT_MAX_BATCH_SIZE='4'" in target.read_text()
    own = tmp_path / "my-service.env"
    own.write_text("VLKIT_API_KEY=s3cret\n")
    kept = cp.discard_generated(own)
    assert not own.exists() and kept.read_text() == "VLKIT_API_KEY=s3cret\n"
    assert cp.discard_generated(target) is None and not target.exists()  # unedited: just removed


@pytest.mark.parametrize("folder", ["tiny #2", "tiny$HOME", "Jane's models", 'a "quoted" \\ name'])
def test_a_model_folder_name_reaches_the_container_as_it_is(tmp_path, folder):
    """` #` would start a comment and `$HOME` be interpolated in compose's env file and YAML: both
    files are written so that compose (and python-dotenv) read the name back unchanged."""
    from dotenv import dotenv_values

    model = tmp_path / folder
    model.mkdir()
    launch = cp.Launch(profile="8gb", model=str(model), service_env={})
    env_file = tmp_path / "vlkit.env"
    cp.write_generated(env_file, cp.render_env_file(launch.env_file_values(), "h"))
    assert dotenv_values(env_file)["VLKIT_MODEL"] == launch.model_in_container
    override = tmp_path / "o.yaml"
    cp.write_generated(override, launch.override_text())
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cfg = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker" / "compose.yaml"), "-f", str(override),
                              "--profile", "8gb", "config", "--format", "json"], capture_output=True, text=True,
                             env={**os.environ, "VLKIT_UP_ENV_FILE": str(env_file)})
        assert cfg.returncode == 0, cfg.stderr
        service = json.loads(cfg.stdout.replace("$$", "$"))["services"]["service-8gb"]  # config writes $ as $$
        assert service["environment"]["VLKIT_MODEL"] == launch.model_in_container
        assert {(v["source"], v["target"]) for v in service["volumes"] if v["type"] == "bind"} >= \
            {(str(model), launch.model_in_container)}


def test_served_name_of_a_local_model_is_its_directory_name(tmp_path):
    model = tmp_path / "Qwen3-VL-2B-Instruct"
    model.mkdir()
    launch = cp.Launch(profile="16gb", model=str(model), vllm_args=["--max-model-len", "4096"])
    assert launch.vllm_command_args()[:1] == ["/models/Qwen3-VL-2B-Instruct"]
    assert launch.served_model_name == "Qwen3-VL-2B-Instruct"
    assert launch.vllm_command_args()[-2:] == ["--max-model-len", "4096"]


@pytest.mark.parametrize("shell, expected", [
    ({}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),                               # native Linux: V1, the accounting planned
    ({"WSL_DISTRO_NAME": "Ubuntu"}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),    # WSL2: V1, which needs no pinned memory
    ({"WSL_DISTRO_NAME": "Ubuntu", "VLLM_USE_V2_MODEL_RUNNER": "1", "VLLM_WSL2_ENABLE_PIN_MEMORY": "1"},
     {"VLLM_USE_V2_MODEL_RUNNER": "1", "VLLM_WSL2_ENABLE_PIN_MEMORY": "1"}),  # the user's own choice wins
])
def test_16gb_starts_vllms_v1_runner_on_linux_and_wsl2(tmp_path, monkeypatch, shell, expected):
    """WSL is detected the doctor's way (wsl.host: the kernel's name, or WSL_DISTRO_NAME for a custom kernel);
    the runner goes to vlkit.env, which compose hands the vLLM container."""
    import wsl.host

    if wsl.host.detect_platform().is_wsl:
        pytest.skip("this machine is WSL: the native-Linux case cannot be shown here")
    for key in ("WSL_DISTRO_NAME", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_WSL2_ENABLE_PIN_MEMORY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in shell.items():
        monkeypatch.setenv(key, value)
    res = _make_up(tmp_path, "PROFILE=16gb", f"MODEL={FP8_4B}", "GPU_MEMORY=16GiB", "ARGS=--dry-run --json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["env_file"] == expected
    eight = _make_up(tmp_path, "PROFILE=8gb", "GPU_MEMORY=8GiB", "ARGS=--dry-run --json")
    assert "VLLM_USE_V2_MODEL_RUNNER" not in json.loads(eight.stdout)["env_file"]   # vLLM's only


def test_up_publishes_vlkit_port_unless_a_port_is_given(tmp_path):
    def url(*flags: str) -> str:
        res = subprocess.run([sys.executable, "-m", "scripts", "up", "--dry-run", "--json", "--gpu-memory", "8GiB",
                              *flags], capture_output=True, text=True, env={**_env(tmp_path), "VLKIT_PORT": "8123"},
                             cwd=ROOT)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["url"]

    assert url() == "http://127.0.0.1:8123"
    assert url("--port", "8124") == "http://127.0.0.1:8124"


def test_a_models_file_given_for_its_folder_is_told_the_folder(tmp_path, tiny_model_dir):
    res = _make_up(tmp_path, "PROFILE=8gb", f"MODEL={tiny_model_dir / 'model.safetensors'}", "ARGS=--cpu --dry-run")
    assert res.returncode != 0
    assert f"a file, not the model's folder: MODEL={tiny_model_dir}?" in res.stderr, res.stderr


def _card(tmp_path, *, compute: str = "9.0", cuda: str = "13.0", driver: str = "580.159.04"):
    """A fake nvidia-smi replaying the H100's recordings with another compute capability, CUDA
    version or driver: the card or driver a user has."""
    from tests.doctor_helpers import H100, fake_nvidia_smi

    data = tmp_path / "smi"
    data.mkdir()
    row = (H100 / "query-gpu.csv").read_text().replace(", 9.0,", f", {compute},").replace("580.159.04", driver)
    (data / "query-gpu.csv").write_text(row)
    table = (H100 / "nvidia-smi.txt").read_text().replace("CUDA Version: 13.0", f"CUDA Version: {cuda}")
    (data / "nvidia-smi.txt").write_text(table.replace("580.159.04", driver))
    fake_nvidia_smi(tmp_path / "bin", table=data / "nvidia-smi.txt", query_gpu=data / "query-gpu.csv",
                    query_apps=H100 / "query-apps.csv", q=H100 / "nvidia-smi-q.txt")
    return {**_env(tmp_path), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(("card", "said"), [
    ({"compute": "6.1"}, "older than compute 7.5"),
    ({"cuda": "12.0", "driver": "526.98"}, "image needs CUDA"),
])
def test_up_refuses_a_card_or_driver_the_image_cannot_run_before_building_anything(tmp_path, tiny_model_dir,
                                                                                  card, said):
    """What the doctor calls blocking stops `up` too, with its fix, before the download and the build
    (which would end in a container that cannot start)."""
    env = _card(tmp_path, **card)
    res = subprocess.run([sys.executable, "-m", "scripts", "up", "--profile", "8gb", "--model", str(tiny_model_dir),
                          "--no-build", "--no-download"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 3, res.stderr
    assert said in res.stderr and "nothing was started" in res.stderr and "fix:" in res.stderr, res.stderr
    assert "not built" not in res.stderr and not (tmp_path / "vlkit.env").exists()


def test_the_no_gpu_hint_of_a_dry_run_keeps_the_users_settings(tmp_path):
    """Without a GPU, a dry run is told to give the card's size: in the command the user ran, with
    PROFILE, MODEL and CONTEXT kept (and a 16 GiB card for the 16gb profile)."""
    env = {**_env(tmp_path), "PATH": "/usr/bin:/bin"}  # no nvidia-smi here either way
    res = subprocess.run([sys.executable, "-m", "scripts", "up", "--profile", "16gb", "--model", FP8_4B,
                          "--context", "8K", "--dry-run"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert (f"`vlkit up --profile 16gb --model {FP8_4B} --context 8192 --gpu-memory 16GiB --dry-run`"
            in res.stderr), res.stderr


def test_clean_without_docker_still_removes_a_model_and_says_what_it_left(tmp_path):
    """`clean MODEL=` needs no Docker for the model cache; a cache folder that does not exist yet is
    'nothing cached', not a traceback. Docker is faked as a stopped engine (this machine's real one
    holds the CI's images)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\nexit 1\n")
    fake.chmod(0o755)
    (tmp_path / "vlkit.env").write_text("VLKIT_MODEL=x\n")
    env = {**_env(tmp_path), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "VLKIT_HF_CACHE": str(tmp_path / "no-cache-yet"), "HF_HUB_CACHE": str(tmp_path / "no-cache-yet")}
    res = subprocess.run([sys.executable, "-m", "scripts", "clean", "--model", "foo/bar"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "left as they are (Docker is not available)" in res.stdout and "foo/bar is not in the cache" in res.stdout
    assert (tmp_path / "vlkit.env").exists()  # a stack that may still run keeps its files


def test_the_no_gpu_hint_to_try_the_cpu_keeps_the_users_model_and_context(tmp_path):
    """`make up MODEL=<the model downloaded>` on a machine whose GPU does not answer: the CPU command
    it offers serves that model, not the default one (which is a download of its own)."""
    env = {**_env(tmp_path), "PATH": "/usr/bin:/bin", "VLKIT_VIA_MAKE": "1"}  # no nvidia-smi here either way
    res = subprocess.run([sys.executable, "-m", "scripts", "up", "--model", FP8_4B, "--context", "4096"],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 3, res.stderr
    assert f"`make up PROFILE=8gb MODEL={FP8_4B} CONTEXT=4096 ARGS=--cpu`" in res.stderr, res.stderr
