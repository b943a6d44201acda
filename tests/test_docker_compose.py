"""docker/compose.yaml as `docker compose config` resolves it, for both profiles and for what
`vlkit up` generates (the `docker` marker: they need the compose CLI); hadolint on both Dockerfiles;
the image facts agree with scripts/images.py."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from scripts import images
from scripts.stack import compose as cp
from tests.docker_helpers import ROOT, require_compose, require_tool


def compose_config(profile: str, *extra_files: Path, env: dict | None = None) -> dict:
    require_compose()
    cmd = ["docker", "compose", "--project-name", "vlkit", "-f", str(cp.COMPOSE_FILE)]
    for f in extra_files:
        cmd += ["-f", str(f)]
    cmd += ["--profile", profile, "config", "--format", "json"]
    import os
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.docker  # the compose CLI
@pytest.mark.parametrize("profile", ["8gb", "16gb"])
def test_each_profile_reserves_a_gpu_and_publishes_on_loopback_only(profile, tmp_path):
    env_file = tmp_path / "vlkit.env"
    env_file.write_text("VLKIT_MAX_PIXELS=12345\nVLKIT_HOST=192.0.2.1\n")
    cfg = compose_config(profile, env={"VLKIT_PORT": "8123", "VLKIT_UP_ENV_FILE": str(env_file)})
    assert list(cfg["services"]) == [cp.SERVICES[profile]]
    svc = cfg["services"][cp.SERVICES[profile]]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert [(p["host_ip"], str(p["published"]), p["target"]) for p in svc["ports"]] == [("127.0.0.1", "8123", 8000)]
    assert svc["restart"] == "unless-stopped"
    assert svc["healthcheck"]["test"][0] == "CMD"
    assert cp.READY_PATHS[profile] in " ".join(svc["healthcheck"]["test"])
    # Settings come from the generated env file ...
    assert svc["environment"]["VLKIT_MAX_PIXELS"] == "12345"
    if profile == "8gb":  # ... but the bind address inside the container is not the env file's to change
        assert svc["environment"]["VLKIT_HOST"] == "0.0.0.0"


@pytest.mark.docker  # the compose CLI
def test_both_profiles_mount_the_one_shared_cache_volume(tmp_path):
    env = {"VLKIT_HF_CACHE": str(tmp_path)}
    mounts = {}
    for profile in ("8gb", "16gb"):
        cfg = compose_config(profile, env=env)
        volumes = cfg["services"][cp.SERVICES[profile]]["volumes"]
        # the host's own hub cache, bind-mounted (Docker Desktop breaks named volumes bound to folders)
        (cache,) = [v for v in volumes if v["target"] == "/cache/huggingface/hub"]
        mounts[profile] = (cache["type"], cache["source"])
        if profile == "8gb":  # the service only reads it; compiled kernels persist on a volume of their own
            assert cache.get("read_only") is True
            (compiled,) = [v for v in volumes if v is not cache]
            assert compiled["type"] == "volume" and compiled["target"] == "/cache/vlkit-compile"
            assert compiled["source"] in cfg["volumes"]
        else:  # vLLM's torch.compile cache too
            (compiled,) = [v for v in volumes if v is not cache]
            assert compiled["type"] == "volume" and compiled["target"] == "/cache/vllm"
    assert mounts["8gb"] == mounts["16gb"] == ("bind", str(tmp_path))


@pytest.mark.docker  # the compose CLI
def test_8gb_service_gets_its_shutdown_grace_before_dockers_sigkill():
    from service.http_limits import SHUTDOWN_BACKSTOP_S, SHUTDOWN_GRACE_S

    svc = compose_config("8gb")["services"]["service-8gb"]
    # compose config writes durations as Go does ("40s"); Docker's default would be 10 s.
    seconds = float(re.fullmatch(r"(\d+)s", svc["stop_grace_period"]).group(1))
    assert seconds > SHUTDOWN_GRACE_S + SHUTDOWN_BACKSTOP_S


@pytest.mark.docker  # the compose CLI
def test_vllm_profile_has_shared_memory_for_its_workers():
    svc = compose_config("16gb")["services"]["vllm-16gb"]
    assert svc.get("ipc") == "host" or svc.get("shm_size")


@pytest.mark.docker  # the compose CLI
def test_generated_override_carries_the_planned_vllm_command(tmp_path, monkeypatch):
    planned = ["--gpu-memory-utilization", "0.85", "--max-model-len", "8192",
               "--mm-processor-kwargs", '{"max_pixels": 1003520}', "--limit-mm-per-prompt", '{"image": 2}']
    launch = cp.Launch(profile="16gb", model="Qwen/Qwen3-VL-4B-Instruct-FP8", vllm_args=planned)
    override = tmp_path / "override.yaml"
    override.write_text(launch.override_text())
    svc = compose_config("16gb", override)["services"]["vllm-16gb"]
    assert svc["command"] == launch.vllm_command_args()
    assert svc["command"][-len(planned):] == planned       # quoting survives compose untouched
    assert svc["command"][:5] == ["Qwen/Qwen3-VL-4B-Instruct-FP8", "--host", "0.0.0.0", "--port", "8000"]


@pytest.mark.docker  # the compose CLI
def test_cpu_override_drops_the_gpu_reservation_and_mounts_a_local_model_read_only(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    launch = cp.Launch(profile="8gb", model=str(model), cpu=True)
    override = tmp_path / "override.yaml"
    override.write_text(launch.override_text())
    svc = compose_config("8gb", override)["services"]["service-8gb"]
    assert "deploy" not in svc or not svc["deploy"].get("resources")
    bind = [v for v in svc["volumes"] if v["type"] == "bind" and v["target"] != "/cache/huggingface/hub"]
    assert [(b["source"], b["target"], b["read_only"]) for b in bind] == [(str(model), "/models/my-model", True)]
    assert launch.env_file_values()["VLKIT_MODEL"] == "/models/my-model"
    assert launch.env_file_values()["VLKIT_DEVICE"] == "cpu"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.8gb", "Dockerfile.16gb"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = require_tool("hadolint")
    res = subprocess.run([hadolint, "--no-color", str(ROOT / "docker" / dockerfile)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _arg_default(dockerfile: str, name: str) -> str:
    text = (ROOT / "docker" / dockerfile).read_text()
    return re.search(rf'^ARG {name}="?([^"\n]+)"?$', text, re.M).group(1)


def test_dockerfile_and_compose_defaults_match_scripts_images():
    assert _arg_default("Dockerfile.8gb", "BASE_IMAGE") == images.SERVICE_BASE_IMAGE
    assert _arg_default("Dockerfile.8gb", "TORCH_INDEX_URL") == images.TORCH_INDEX_URL
    assert _arg_default("Dockerfile.8gb", "TORCH_PACKAGES") == (
        f"torch=={images.TORCH_VERSION} torchvision=={images.TORCHVISION_VERSION}")
    assert _arg_default("Dockerfile.16gb", "VLLM_IMAGE") == images.VLLM_IMAGE
    assert images.SERVICE_BASE_IMAGE.startswith(f"nvidia/cuda:{images.SERVICE_CUDA}.")
    assert images.TORCH_INDEX_URL.endswith("cu" + images.SERVICE_CUDA.replace(".", ""))
    text = cp.COMPOSE_FILE.read_text()
    default_tags = dict(re.findall(r"\$\{(VLKIT_\w+_IMAGE):-([^}]+)\}", text))
    version = images.VLKIT_VERSION
    assert default_tags["VLKIT_SERVICE_IMAGE"] == f"{images.SERVICE_IMAGE_REPO}:{version}"
    assert default_tags["VLKIT_VLLM_IMAGE"] == f"vlkit/vllm-16gb:{version}-vllm{images.VLLM_VERSION}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={images.TORCH_VERSION}"' in pyproject
