"""The real 8gb image, built as CI builds it (only BASE_IMAGE and the torch wheel swapped), serving
the tiny Qwen3-VL through the official openai SDK."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.docker_helpers import free_port, png_data_url, service_image, shared_model_dir  # noqa: F401

pytestmark = pytest.mark.docker


def _inspect(name: str, fmt: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", fmt, name], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def container(service_image, shared_model_dir):
    port = free_port()
    name = f"vlkit-test-image-{port}"
    cmd = ["docker", "run", "-d", "--name", name, "--network", "host",
           "-e", "VLKIT_HOST=127.0.0.1", "-e", f"VLKIT_PORT={port}", "-e", "HF_HUB_OFFLINE=1",
           "-v", f"{shared_model_dir}:/models/tiny:ro",
           service_image, "--model", "/models/tiny", "--served-model-name", "tiny",
           "--max-model-len", "512", "--max-pixels", "16384", "--min-pixels", "3136"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    try:
        yield name, port
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def _wait_healthy(name: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _inspect(name, "{{.State.Health.Status}}")
        if status in ("healthy", "unhealthy") or _inspect(name, "{{.State.Status}}") != "running":
            break
        time.sleep(1)
    return status


def test_container_becomes_healthy_and_answers_the_openai_sdk(container):
    from openai import OpenAI

    name, port = container
    status = _wait_healthy(name)
    logs = subprocess.run(["docker", "logs", "--tail", "30", name], capture_output=True, text=True)
    assert status == "healthy", f"health: {status!r}\n{logs.stdout}{logs.stderr}"

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(64, 48)}},
            {"type": "text", "text": "What is in this picture?"}]}])
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1
    # The image was really seen: its tokens count in the prompt.
    text_only = client.chat.completions.create(
        model="tiny", max_tokens=1, messages=[{"role": "user", "content": "What is in this picture?"}])
    assert out.usage.prompt_tokens > text_only.usage.prompt_tokens
    # Structured outputs (llguidance, in the image too): the answer is one of the choices.
    choice = client.chat.completions.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": "Yes?"}],
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")


def test_service_runs_as_a_non_root_user(container):
    name, _ = container
    uid = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
    assert uid.isdigit() and int(uid) != 0
    assert _inspect(name, "{{.Config.User}}") not in ("", "0", "root")


def test_image_declares_healthcheck_cache_volume_and_loopback_default(service_image):
    cfg = json.loads(_inspect(service_image, "{{json .Config}}"))
    assert "/health/ready" in " ".join(cfg["Healthcheck"]["Test"])
    assert "/cache/huggingface" in cfg["Volumes"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["HF_HOME"] == "/cache/huggingface"
    # 0.0.0.0 inside only; compose publishes on the host's 127.0.0.1 (checked in test_docker_compose).
    assert env["VLKIT_HOST"] == "0.0.0.0"
    assert cfg["Entrypoint"] == ["python3", "-m", "service"]
