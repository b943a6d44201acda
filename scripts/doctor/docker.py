"""Docker checks: CLI, daemon, Docker Desktop or an engine inside WSL, compose v2, the NVIDIA
runtime, and (opt-in, cached) a GPU inside a container."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.doctor.model import Check, fail, ok, warn
from scripts.stack.docker import COMPOSE_UPDATE, compose_too_old
from scripts.usage import command

CONTAINER_CHECK_TTL_S = 24 * 3600
CONTAINER_TIMEOUT_S = 180  # the first start of a large image can take a while

TOOLKIT_FIX = ("install the NVIDIA Container Toolkit: `sudo apt-get install -y nvidia-container-toolkit && "
               "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker` "
               "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html)")
DESKTOP_GPU_FIX = ("Docker Desktop: use the WSL 2 based engine (Settings > General), update Docker Desktop and the "
                   "Windows NVIDIA driver, then restart Docker Desktop")


# --------------------------------------------------------------------------- pure parsers

def parse_info(text: str) -> dict | None:
    """`docker info --format '{{json .}}'` -> dict when a daemon answered (ServerVersion set)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("ServerVersion") else None


def is_docker_desktop(info: dict) -> bool:
    return "docker desktop" in str(info.get("OperatingSystem", "")).lower()


def compose_version(info_text: str) -> str | None:
    """Compose v2's version from the CLI plugins listed in `docker info` JSON (ClientInfo.Plugins);
    present even when the daemon is down."""
    try:
        data = json.loads(info_text)
    except ValueError:
        return None
    client = data.get("ClientInfo") if isinstance(data, dict) else None
    plugins = client.get("Plugins") if isinstance(client, dict) else None
    for plugin in plugins if isinstance(plugins, list) else []:
        if isinstance(plugin, dict) and plugin.get("Name") == "compose" and not plugin.get("Err"):
            return plugin.get("Version") or "?"
    return None


def gpu_runtime(info: dict, hook_on_path: bool = False) -> str | None:
    """How this daemon can give containers a GPU, or None. Docker registers the `--gpus` driver when
    nvidia-container-runtime-hook is on its PATH; a 'nvidia' runtime or CDI specs work too; Docker
    Desktop's WSL 2 engine brings its own."""
    runtimes = info.get("Runtimes") or {}
    if "nvidia" in runtimes:
        return "nvidia runtime"
    if is_docker_desktop(info):
        return "Docker Desktop (built-in GPU support)"
    for d in info.get("CDISpecDirs") or []:
        try:
            if any("nvidia" in n for n in os.listdir(d)):
                return f"CDI specs in {d}"
        except OSError:
            continue
    if hook_on_path:
        return "nvidia-container-runtime-hook"
    return None


def docker_root_dir(result) -> str | None:
    info = parse_info(result.stdout) if result is not None and result.returncode == 0 else None
    if not info or is_docker_desktop(info):
        return None  # Docker Desktop's root is inside its own VM
    return info.get("DockerRootDir") or None


def explain_daemon_error(stderr: str, desktop_cli: bool, systemd: bool, wsl: bool | None = None) -> str:
    """The fix for a daemon that did not answer, from the CLI's error text (``wsl``: inside WSL, where
    systemd is a /etc/wsl.conf setting; None: this machine's)."""
    text = stderr.lower()
    if "permission denied" in text:
        return "add yourself to the docker group: `sudo usermod -aG docker $USER`, then log out and in (or `newgrp docker`)"
    if desktop_cli:
        return ("start Docker Desktop and enable this distro under Settings > Resources > WSL integration")
    if systemd:
        return "start the engine: `sudo systemctl enable --now docker`"
    if wsl is None:
        from wsl.host import detect_platform
        wsl = detect_platform().is_wsl
    if wsl:
        return "start the engine: `sudo service docker start` (or enable systemd in /etc/wsl.conf: [boot] systemd=true)"
    return "start the engine: `sudo service docker start`"


def explain_gpu_run_error(output: str) -> tuple[str, str]:
    """(what happened, fix) for a failed `docker run --gpus all ... nvidia-smi`."""
    text = output.lower()
    if 'could not select device driver "" with capabilities: [[gpu]]' in text or "could not select device driver" in text:
        return ("Docker has no NVIDIA GPU driver: `could not select device driver \"\" with capabilities: [[gpu]]`",
                TOOLKIT_FIX)
    if "unknown or invalid runtime name: nvidia" in text:
        return "the 'nvidia' runtime is not configured in Docker", TOOLKIT_FIX
    if "unsatisfied condition: cuda>=" in text:
        return ("the image needs a newer CUDA than the driver supports",
                "update the NVIDIA driver (Windows driver under WSL2)")
    if "driver not loaded" in text or "nvml error" in text or "failed to initialize nvml" in text:
        return ("the container toolkit cannot talk to the driver (NVML)",
                "check `nvidia-smi` on the host; WSL2: do not install a Linux NVIDIA driver inside WSL")
    if "libnvidia-ml.so.1: file exists" in text:
        return ("the image carries its own NVIDIA driver libraries, which clash with WSL's",
                "use an image without driver libraries (vlkit's images are built that way)")
    if "executable file not found" in text and "nvidia-smi" in text:
        return ("the container started with a GPU, but nvidia-smi was not injected",
                "set NVIDIA_DRIVER_CAPABILITIES=compute,utility for the container")
    last = output.strip().splitlines()[-1] if output.strip() else "no output"
    return f"docker run --gpus failed: {last[:200]}", "run `docker run --rm --gpus all IMAGE nvidia-smi` to see the full error"


# --------------------------------------------------------------------------- the GPU-in-a-container check

@dataclass
class ContainerResult:
    status: str  # "ok" | "fail" | "skipped" | "not-run"
    found: str
    fix: str | None
    at: float  # when it ran
    key: str  # what it ran against (daemon, driver, image); a change invalidates the cache
    cached: bool = False


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlkit" / "doctor-gpu-container.json"


def _load_cached(key: str) -> ContainerResult | None:
    try:
        data = json.loads(_cache_file().read_text())
        result = ContainerResult(**data)
    except (OSError, ValueError, TypeError):
        return None
    if result.key != key or time.time() - result.at > CONTAINER_CHECK_TTL_S:
        return None
    result.cached = True
    return result


def _store(result: ContainerResult) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result)))
        os.replace(tmp, path)
    except OSError:
        pass


def _candidate_images() -> list[str]:
    try:
        from scripts import images
    except ImportError:
        return []
    return [images.image_for("8gb"), images.image_for("16gb"), images.SERVICE_BASE_IMAGE]


def container_gpu_result(facts, run_now: bool) -> ContainerResult | None:
    """Cached result if fresh; with run_now, run the container (slow) and cache what it says."""
    from scripts.doctor.facts import run

    info = parse_info(facts.docker_info.stdout) if facts.docker_info and facts.docker_info.returncode == 0 else None
    if info is None:
        return None
    driver = facts.gpu.gpus[0].driver_version if facts.gpu.gpus else "no-driver"
    key = f"{info.get('ID', '')}|{info.get('ServerVersion')}|{driver}"
    cached = _load_cached(key)
    if not run_now:
        return cached
    image = next((i for i in _candidate_images()
                  if run([facts.docker_path, "image", "inspect", "--format", "{{.Id}}", i]).returncode == 0), None)
    if image is None:
        return ContainerResult("skipped", "no vlkit image here to test with (nothing is pulled for this check)",
                               f"build the images first: `{command('build')}`", time.time(), key)
    r = run([facts.docker_path, "run", "--rm", "--gpus", "all", "--network", "none",
             "--entrypoint", "nvidia-smi", image, "-L"], timeout=CONTAINER_TIMEOUT_S)
    if r.returncode == 0 and "GPU " in r.stdout:
        result = ContainerResult("ok", f"{image}: {r.stdout.strip().splitlines()[0]}", None, time.time(), key)
    else:
        found, fix = explain_gpu_run_error(r.stdout + "\n" + r.stderr)
        result = ContainerResult("fail", found, fix, time.time(), key)
    _store(result)
    return result


# --------------------------------------------------------------------------- checks

def checks(facts) -> list[Check]:
    out: list[Check] = []
    wsl = facts.platform.is_wsl
    if not facts.docker_path:
        fix = ("install Docker Desktop for Windows and turn on WSL integration for this distro, or Docker Engine "
               "inside WSL: https://docs.docker.com/engine/install/ubuntu/") if wsl else \
              "install Docker Engine: https://docs.docker.com/engine/install/"
        return [fail("docker", "docker CLI not found", fix)]
    real = os.path.realpath(facts.docker_path)
    desktop_cli = "docker-desktop" in real or real.startswith("/mnt/")
    info = parse_info(facts.docker_info.stdout) if facts.docker_info and facts.docker_info.returncode == 0 else None
    if info is None:
        error = facts.docker_info.first_error if facts.docker_info else "no answer"
        out.append(fail("docker", f"daemon not reachable: {error}",
                        explain_daemon_error(error, desktop_cli, facts.systemd, facts.platform.is_wsl)))
    else:
        kind = "Docker Desktop" if is_docker_desktop(info) else f"Docker Engine on {info.get('OperatingSystem', '?')}"
        if wsl and not is_docker_desktop(info):
            kind += " (inside WSL)"
        out.append(ok("docker", f"{kind}, server {info.get('ServerVersion')}"))
    compose = compose_version(facts.docker_info.stdout) if facts.docker_info else None
    too_old = compose_too_old(compose) if compose else None
    if too_old:
        out.append(fail("compose", too_old, COMPOSE_UPDATE))
    elif compose:
        out.append(ok("compose", f"Docker Compose {compose}"))
    else:
        out.append(fail("compose", "`docker compose` (v2 plugin) not found",
                        "Docker Desktop: update it; Debian/Ubuntu: `sudo apt-get install docker-compose-plugin` "
                        "(Docker's repo) or `docker-compose-v2` (Ubuntu's)"))
    if info is not None:
        how = gpu_runtime(info, hook_on_path=shutil.which("nvidia-container-runtime-hook") is not None)
        if how:
            out.append(ok("docker-gpu", f"containers can get the GPU via {how}"))
        else:
            fix = DESKTOP_GPU_FIX if is_docker_desktop(info) else TOOLKIT_FIX
            out.append(fail("docker-gpu", "no NVIDIA runtime in Docker (runtimes: "
                            f"{', '.join(sorted((info.get('Runtimes') or {}).keys())) or 'none'}); "
                            "`--gpus` would fail with: could not select device driver \"\" with capabilities: [[gpu]]",
                            fix))
    result = facts.gpu_container
    if result is None:
        if info is not None:
            out.append(warn("gpu-in-container", "not checked yet (slow: starts a container)",
                            f"`{command('doctor', gpu_container=True)}` (the result is cached for a day)"))
    elif result.status == "ok":
        out.append(ok("gpu-in-container", result.found + (" (cached)" if result.cached else "")))
    elif result.status == "skipped":
        out.append(warn("gpu-in-container", result.found, result.fix))
    else:
        out.append(fail("gpu-in-container", result.found + (" (cached)" if result.cached else ""), result.fix))
    return out
