"""Fixtures for the Docker tests: a real engine, the real 8gb image built the way CI builds it, and
a tiny model directory containers can read.

Outside CI a missing engine skips these tests with the reason; in CI (CI=true) it fails them, since
`make test` installs and starts the engine there and a Docker test that never runs proves nothing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
VLKIT = [sys.executable, "-m", "scripts"]
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CI_BASE_IMAGE = os.environ.get("VLKIT_CI_BASE_IMAGE", "vlkit-ci-base:bookworm")
# Never the user's tag or project; the variables keep two checkouts sharing one engine apart.
TEST_IMAGE = os.environ.get("VLKIT_TEST_IMAGE", "vlkit/service-8gb:test")
TEST_PROJECT = os.environ.get("VLKIT_TEST_PROJECT", "vlkit-test")


def unavailable(reason: str):
    """Fail in CI, skip elsewhere (with the reason and how to get it)."""
    if CI:
        pytest.fail(f"{reason} (CI must run the Docker tests: `make test` sets them up)")
    pytest.skip(f"{reason}; `make test` installs and starts it")


def require_tool(name: str) -> str:
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if not path:
        unavailable(f"{name} is not installed")
    return path


def require_compose() -> None:
    require_tool("docker")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        unavailable("docker compose v2 is not installed")


def require_engine() -> None:
    require_compose()
    res = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if res.returncode != 0:
        unavailable(f"no Docker engine answers ({(res.stderr or res.stdout).strip()[:200]})")


def png_data_url(width: int = 64, height: int = 48) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_wheel_spec() -> str:
    """`torch==<version of the wheel in docker/wheels>` (the CPU wheel CI builds the image with)."""
    wheels = sorted((ROOT / "docker" / "wheels").glob("torch-*.whl"))
    if not wheels:
        unavailable("no torch wheel in docker/wheels/ (scripts/setup-test-env.sh puts it there)")
    version = wheels[0].name.split("-")[1]
    return f"torch=={version}"


def build_env(**extra: str) -> dict[str, str]:
    """Environment for `vlkit` subprocesses: CI build args, a separate tag, project and state files."""
    env = dict(os.environ)
    env.update(
        VLKIT_BUILD_BASE_IMAGE=CI_BASE_IMAGE,
        VLKIT_BUILD_TORCH_INDEX_URL="https://pypi.org/simple",
        VLKIT_BUILD_TORCH_PACKAGES=torch_wheel_spec(),
        VLKIT_BUILD_NETWORK="host",
        VLKIT_SERVICE_IMAGE=TEST_IMAGE,
        VLKIT_PROJECT=TEST_PROJECT,
    )
    env.update(extra)
    return env


def say(config, text: str) -> None:
    """A progress line on the terminal while pytest captures output (long fixtures say what they do)."""
    with config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n  {text}", flush=True)


@pytest.fixture(scope="session")
def service_image(pytestconfig) -> str:
    """The real docker/Dockerfile.8gb built through `vlkit build` with CI's BASE_IMAGE and torch wheel."""
    require_engine()
    say(pytestconfig, f"building {TEST_IMAGE} from docker/Dockerfile.8gb (cold: about 2 min; cached: seconds)...")
    if subprocess.run(["docker", "image", "inspect", CI_BASE_IMAGE], capture_output=True).returncode != 0:
        res = subprocess.run(["bash", str(ROOT / "scripts" / "make-base-image.sh"), CI_BASE_IMAGE],
                             capture_output=True, text=True)
        if res.returncode != 0:
            unavailable(f"cannot make the base image {CI_BASE_IMAGE}: {res.stdout[-500:]}{res.stderr[-500:]}")
    res = subprocess.run([*VLKIT, "build", "--profile", "8gb"], cwd=ROOT, env=build_env(),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"vlkit build failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    return TEST_IMAGE


@pytest.fixture(scope="session")
def shared_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model where the container's non-root user can read it (pytest's tmp dirs are 0700)."""
    root = Path(tmp_path_factory.mktemp("docker-models"))
    target = root / "tiny-qwen3-vl"
    shutil.copytree(tiny_model_dir, target)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return target
