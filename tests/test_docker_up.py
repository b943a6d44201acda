"""`make up` end to end with the real engine: the 8gb image on CPU serving the tiny model through
compose (published on 127.0.0.1), `vlkit caption`/`status`/`down`, and the real Docker error for a
missing GPU runtime translated into its fix."""
from __future__ import annotations

import os
import shutil
import textwrap
import subprocess
import sys

import pytest

from tests.docker_helpers import (ROOT, TEST_PROJECT, build_env, free_port, service_image,  # noqa: F401
                                  shared_model_dir)

pytestmark = pytest.mark.docker


@pytest.fixture
def stack_env(tmp_path, service_image):
    env = build_env(VLKIT_UP_ENV_FILE=str(tmp_path / "vlkit.env"),
                    VLKIT_OVERRIDE_FILE=str(tmp_path / "vlkit.compose.yaml"),
                    HF_HUB_CACHE=str(tmp_path / "hub"))
    yield env
    subprocess.run([sys.executable, "-m", "scripts", "down"], env=env, cwd=ROOT, capture_output=True)


def _vlkit(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_make_up_cpu_serves_the_tiny_model_then_caption_status_down(stack_env, shared_model_dir, tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    port = free_port()
    res = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "up", "PROFILE=8gb",
                          f"MODEL={shared_model_dir}", f"PORT={port}", "ARGS=--cpu --no-download --timeout 600"],
                         env=stack_env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"http://127.0.0.1:{port}/v1" in res.stdout
    assert "curl http://127.0.0.1" in res.stdout and "openai.OpenAI(" in res.stdout
    _run_the_printed_examples(res.stdout, tmp_path)
    env_file = (tmp_path / "vlkit.env").read_text()
    assert "VLKIT_MODEL='/models/tiny-qwen3-vl'" in env_file and "VLKIT_DEVICE='cpu'" in env_file

    from PIL import Image
    img = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img)
    cap = _vlkit(stack_env, "caption", str(img), "--port", str(port))
    assert cap.returncode == 0, cap.stderr  # models listed, image sent, an answer printed

    status = _vlkit(stack_env, "status")
    assert f"service-8gb: http://127.0.0.1:{port}/v1  ready" in status.stdout, status.stdout

    # Published on loopback only.
    ports = subprocess.run(["docker", "compose", "--project-name", TEST_PROJECT, "-f",
                            str(ROOT / "docker" / "compose.yaml"), "--profile", "8gb", "port", "service-8gb",
                            "8000"], env=stack_env, capture_output=True, text=True)
    assert ports.stdout.strip() == f"127.0.0.1:{port}", ports.stdout + ports.stderr

    # Asked about another port, it says what answers there too; stopped, it says so.
    other = free_port()
    assert f"nothing answers on 127.0.0.1:{other}." in _vlkit(stack_env, "status", "--port", str(other)).stdout
    subprocess.run(["docker", "compose", "--project-name", TEST_PROJECT, "-f", str(ROOT / "docker" / "compose.yaml"),
                    "--profile", "8gb", "stop", "service-8gb"], env=stack_env, capture_output=True, timeout=120)
    assert "vlkit's container is not running" in _vlkit(stack_env, "status").stdout

    down = _vlkit(stack_env, "down")
    assert down.returncode == 0
    assert "vlkit is not running, and nothing answers" in _vlkit(stack_env, "status", "--port", str(port)).stdout
    gone = _vlkit(stack_env, "caption", str(img), "--port", str(port))
    assert gone.returncode == 1 and "`vlkit up`" in gone.stderr


def _block(stdout: str, title: str) -> str:
    lines = stdout.split(title, 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(lines.strip("\n"))


def _run_the_printed_examples(stdout: str, workdir) -> None:
    """The curl and Python examples `make up` prints work as pasted (with a photo.jpg beside them)."""
    from PIL import Image

    Image.new("RGB", (64, 48), (30, 160, 60)).save(workdir / "photo.jpg", "JPEG")
    if shutil.which("curl"):
        out = subprocess.run(["bash", "-c", _block(stdout, "curl:\n")], cwd=workdir, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and '"choices"' in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", _block(stdout, "Python (pip install openai):\n")], cwd=workdir,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_gpu_request_without_gpu_runtime_is_explained(stack_env, shared_model_dir):
    # This engine has no NVIDIA runtime: the real "could not select device driver" error comes back.
    res = _vlkit(stack_env, "up", "--profile", "8gb", "--model", str(shared_model_dir), "--gpu-memory", "8GiB",
                 "--skip-gate", "--no-download", "--port", str(free_port()), "--timeout", "120")
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "could not select device driver" in out
    # Both fixes, each on one unbroken line: the toolkit's commands and Docker Desktop's WSL 2 engine.
    assert "sudo nvidia-ctk runtime configure --runtime=docker" in out and "use the WSL 2 based engine" in out


def test_a_service_that_cannot_load_fails_fast_with_its_logs_and_is_stopped(stack_env, shared_model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(shared_model_dir, broken)
    (broken / "tokenizer.json").write_text("not json")
    for p in [broken, *broken.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    res = _vlkit(stack_env, "up", "--cpu", "--profile", "8gb", "--model", str(broken), "--no-download",
                 "--port", str(free_port()), "--timeout", "300", timeout=400)
    assert res.returncode == 1
    assert "did not become ready" in res.stderr
    # The container's own last lines, showing why (json's error for the broken tokenizer.json).
    assert "last log lines of service-8gb" in res.stdout and "Expecting value" in res.stdout
    ps = subprocess.run(["docker", "ps", "--filter", f"label=com.docker.compose.project={TEST_PROJECT}", "-q"],
                        capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # stopped, not left restarting in a loop


def test_a_port_held_by_another_program_is_refused_before_anything_starts(shared_model_dir, tmp_path):
    """Checked before the download and the build (minutes): the fix keeps what the user typed."""
    import socket

    if not shutil.which("make"):
        pytest.skip("make is not installed")
    env = {**os.environ, "VLKIT_UP_ENV_FILE": str(tmp_path / "vlkit.env"), "VLKIT_PROJECT": TEST_PROJECT,
           "VLKIT_OVERRIDE_FILE": str(tmp_path / "o.yaml"), "VLKIT_SERVICE_IMAGE": "vlkit/never-built:port-test"}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "up", "PROFILE=8gb",
                              f"MODEL={shared_model_dir}", f"PORT={port}", "ARGS=--cpu"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stdout + res.stderr
    assert f"127.0.0.1:{port} is taken by" in res.stderr and "nothing was started" in res.stderr, res.stderr
    assert f"make up PROFILE=8gb MODEL={shared_model_dir} PORT=" in res.stderr and "ARGS=--cpu" in res.stderr
    assert "building" not in res.stdout and not (tmp_path / "vlkit.env").exists()
