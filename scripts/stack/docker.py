"""The Docker engine calls vlkit needs: build, image and container state, logs, the cache volume."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from scripts import images
from scripts.stack.compose import CONTAINER_PORT, ROOT, compose_cmd, run
from scripts.usage import command

SOURCE_LABEL = "org.vlkit.source-hash"
MIN_COMPOSE = (2, 24)   # env_file `required: false` and `!reset` (the CPU override) arrived in 2.24
# What each image is built from (its Dockerfile and what it COPYs, which .dockerignore lets through):
# a change to any of these makes `vlkit up` rebuild it. The host CLI (scripts/, wsl/) is not here.
SOURCE_PATHS = {
    "8gb": ("pyproject.toml", "service", "bench", "docker/Dockerfile.8gb"),
    "16gb": ("docker/Dockerfile.16gb",),
}


COMPOSE_UPDATE = "update Docker Desktop, or the docker-compose-plugin package"


def compose_too_old(version: str) -> str | None:
    """Why this compose version (`2.20.2`, `v2.40.3`) cannot run compose.yaml, or None."""
    found = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if not found or found >= MIN_COMPOSE:
        return None
    return (f"docker compose {version.strip()} is too old: compose.yaml needs {'.'.join(map(str, MIN_COMPOSE))} "
            "or newer (optional env_file, !reset)")


class DockerError(RuntimeError):
    """Docker is missing or failed; the message says what to do."""


def require_docker() -> None:
    """Docker CLI, compose v2 new enough for compose.yaml, and a daemon that answers; else why + fix."""
    docker = shutil.which("docker")
    if not docker:
        raise DockerError("docker is not installed. Install Docker Desktop (WSL2 backend) or Docker Engine, "
                          f"then `{command('doctor')}`.")
    res = run(["docker", "compose", "version", "--short"], capture=True)
    if res.returncode != 0:
        raise DockerError("`docker compose` (v2) is missing: update Docker Desktop, or install the "
                          "docker-compose-plugin package.")
    too_old = compose_too_old(res.stdout)
    if too_old:
        raise DockerError(f"{too_old}: {COMPOSE_UPDATE}.")
    # Otherwise a stopped daemon surfaces later as a failed build or an unexplained compose error.
    res = run(["docker", "info", "--format", "{{.ServerVersion}}"], capture=True)
    if res.returncode != 0:
        from scripts.doctor.docker import explain_daemon_error
        from wsl.host import systemd_running

        error = (res.stderr or res.stdout).strip().splitlines()
        real = os.path.realpath(docker)
        fix = explain_daemon_error("\n".join(error), "docker-desktop" in real or real.startswith("/mnt/"),
                                   systemd_running())
        raise DockerError(f"the Docker daemon does not answer ({error[-1] if error else 'no output'}). Fix: {fix}.")


@dataclass
class BuildOptions:
    """Build arguments; the defaults are what users build (scripts/images.py). CI overrides them
    through VLKIT_BUILD_* variables because no registry or CUDA index is reachable there."""

    base_image: str = images.SERVICE_BASE_IMAGE
    torch_index_url: str = images.TORCH_INDEX_URL
    torch_packages: str = f"torch=={images.TORCH_VERSION} torchvision=={images.TORCHVISION_VERSION}"
    vllm_image: str = images.VLLM_IMAGE
    network: str | None = None   # e.g. "host" where the daemon has no bridge network (CI)

    @classmethod
    def from_env(cls) -> "BuildOptions":
        o = cls()
        e = os.environ
        o.base_image = e.get("VLKIT_BUILD_BASE_IMAGE", o.base_image)
        o.torch_index_url = e.get("VLKIT_BUILD_TORCH_INDEX_URL", o.torch_index_url)
        o.torch_packages = e.get("VLKIT_BUILD_TORCH_PACKAGES", o.torch_packages)
        o.vllm_image = e.get("VLKIT_BUILD_VLLM_IMAGE", o.vllm_image)
        o.network = e.get("VLKIT_BUILD_NETWORK") or None
        return o


def source_hash(root: Path = ROOT, profile: str = "8gb") -> str:
    """Hash of everything the profile's image is built from (ignoring caches), to rebuild only when stale."""
    h = hashlib.sha256()
    for rel in SOURCE_PATHS[profile]:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else ([p] if p.exists() else [])
        for f in files:
            if "__pycache__" in f.parts or f.suffix in (".pyc", ".tmp"):
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_cmd(profile: str, opts: BuildOptions, *, tag: str | None = None, root: Path = ROOT) -> list[str]:
    tag = tag or images.image_for(profile)  # type: ignore[arg-type]
    cmd = ["docker", "build", "-f", str(root / "docker" / f"Dockerfile.{profile}"), "-t", tag]
    if opts.network:
        cmd += ["--network", opts.network]
    if profile == "8gb":
        cmd += ["--build-arg", f"BASE_IMAGE={opts.base_image}",
                "--build-arg", f"TORCH_INDEX_URL={opts.torch_index_url}",
                "--build-arg", f"TORCH_PACKAGES={opts.torch_packages}"]
    else:
        cmd += ["--build-arg", f"VLLM_IMAGE={opts.vllm_image}"]
    return cmd + ["--label", f"{SOURCE_LABEL}={source_hash(root, profile)}", str(root)]


def image_label(tag: str, label: str) -> str | None:
    """The label's value; None when the image is missing (or has no such label: "")."""
    res = run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", tag], capture=True)
    if res.returncode != 0:
        return None
    labels = json.loads(res.stdout.strip() or "null") or {}
    return labels.get(label, "")


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], capture=True).returncode == 0


def needs_build(profile: str) -> str | None:
    """Why the profile's image must be built, or None when it is there and current."""
    tag = images.image_for(profile)  # type: ignore[arg-type]
    label = image_label(tag, SOURCE_LABEL)
    if label is None:
        return f"{tag} is not built yet"
    if label != source_hash(profile=profile):
        return f"{tag} is older than the source"
    return None


def container_id(service: str) -> str | None:
    res = run(compose_cmd(None, "ps", "-a", "-q", service), capture=True)
    cid = res.stdout.strip().splitlines()
    return cid[0] if res.returncode == 0 and cid else None


@dataclass
class ContainerState:
    status: str             # created | running | restarting | exited | dead
    health: str | None      # starting | healthy | unhealthy | None (no healthcheck)
    exit_code: int
    restarts: int
    error: str


def container_state(cid: str) -> ContainerState | None:
    res = run(["docker", "inspect", "-f", "{{json .State}}|{{.RestartCount}}", cid], capture=True)
    if res.returncode != 0:
        return None
    state_json, _, restarts = res.stdout.strip().rpartition("|")
    s = json.loads(state_json)
    health = (s.get("Health") or {}).get("Status")
    return ContainerState(s.get("Status", "?"), health, int(s.get("ExitCode") or 0),
                          int(restarts or 0), s.get("Error") or "")


def logs_tail(cid: str, lines: int = 40) -> str:
    res = run(["docker", "logs", "--tail", str(lines), cid], capture=True)
    return (res.stdout or "") + (res.stderr or "")


def published_port(service: str) -> int | None:
    """The host port of a running vlkit service (for status/caption, which take no --port)."""
    res = run(compose_cmd(None, "ps", "--format", "json", service), capture=True)
    if res.returncode != 0 or not res.stdout.strip():
        return None
    text = res.stdout.strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    for row in rows:
        for pub in row.get("Publishers") or []:
            if pub.get("TargetPort") == CONTAINER_PORT and pub.get("PublishedPort"):
                return int(pub["PublishedPort"])
    return None
