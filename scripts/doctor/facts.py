"""Gather what the checks need, concurrently and with short timeouts, so `vlkit doctor` stays
under 3 seconds. Everything that touches the system lives here; the checks are pure functions
of the Facts this returns."""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scripts.gpu import GpuProbe, probe
from scripts.hf_cache import hub_cache
from scripts.stack.client import port_free, what_answers
from wsl import wslconfig
from wsl.host import (
    HostRam, Platform, detect_platform, host_ram, interop_enabled, is_windows_path, systemd_running, windows_to_wsl_path,
    windows_userprofile,
)

QUICK_TIMEOUT_S = 2.5


@dataclass
class Options:
    profile: str = "auto"  # "auto" | "8gb" | "16gb"
    model: str | None = None
    gpu_container: bool = False
    wslconfig: Path | None = None
    port: int | None = None  # the port `make up PORT=` would publish; None: $VLKIT_PORT, else 8000


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def first_error(self) -> str:
        text = (self.stderr or self.stdout).strip()
        return text.splitlines()[-1] if text else f"exit status {self.returncode}"


@dataclass
class Facts:
    platform: Platform
    systemd: bool
    gpu: GpuProbe
    ldconfig: str | None = None  # `ldconfig -p`
    docker_path: str | None = None
    docker_info: CommandResult | None = None  # `docker info --format '{{json .}}'`
    interop: bool = False
    wslconfig_path: Path | None = None
    wslconfig: wslconfig.WslConfig | None = None
    wslconfig_error: str | None = None
    wslconfig_given: bool = False  # the user named the file (--wslconfig): the fixes name it too
    host_ram: HostRam | None = None
    hf_cache: Path | None = None
    disk_free: dict[str, int] = field(default_factory=dict)  # path -> free bytes
    port: int = 8000
    settings_error: str | None = None  # a malformed VLKIT_* variable in this shell
    port_free: bool | None = None
    port_holder: str | None = None  # what answers on the port when it is taken (client.what_answers)
    models: dict[str, str] = field(default_factory=dict)  # profile -> model id
    model_given: str | None = None  # the user named the model (--model): the fixes name it too
    model_cached: dict[str, bool] = field(default_factory=dict)  # model id -> in the HF cache
    plans: dict[str, object] = field(default_factory=dict)  # profile -> Plan, or an error str
    gpu_container: object | None = None  # docker.ContainerResult


def run(cmd: list[str], timeout: float = QUICK_TIMEOUT_S) -> CommandResult:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return CommandResult(p.returncode, p.stdout, p.stderr)
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"`{' '.join(cmd[:3])}` did not answer within {timeout:.0f} s")
    except OSError as exc:
        return CommandResult(127, "", f"cannot run {cmd[0]}: {exc.strerror}")


def _ldconfig() -> str | None:
    exe = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if exe is None:
        return None
    r = run([exe, "-p"])
    return r.stdout if r.returncode == 0 else None


def _docker_info(docker: str | None) -> CommandResult | None:
    return run([docker, "info", "--format", "{{json .}}"]) if docker else None


def _wslconfig(platform: Platform, given: Path | None) -> tuple[Path | None, wslconfig.WslConfig | None, str | None]:
    path = given
    if path is not None and is_windows_path(path):  # as `vlkit wsl config` reads one
        return path, None, f"a Windows path; in WSL it is {windows_to_wsl_path(str(path))}"
    if path is None:
        if not platform.is_wsl:
            return None, None, None
        folder = windows_userprofile(timeout=QUICK_TIMEOUT_S)
        if folder is None:
            return None, None, "cannot find the Windows profile folder (interop off?)"
        path = folder / ".wslconfig"
    try:
        return path, wslconfig.load(path), None
    except wslconfig.WslConfigError as exc:
        return path, None, str(exc)


def model_in_cache(model: str, cache: Path) -> bool:
    """A local folder with config.json, or a hub id whose snapshot in the cache has config.json."""
    if os.path.isdir(model):
        return os.path.isfile(os.path.join(model, "config.json"))
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(model, "config.json", cache_dir=str(cache))
    except Exception:  # an invalid repo id
        return False
    return isinstance(found, str)


def _disk_free(paths: list[Path]) -> dict[str, int]:
    out = {}
    for p in paths:
        probe_path = p
        while not probe_path.exists() and probe_path != probe_path.parent:
            probe_path = probe_path.parent  # the cache may not exist yet: measure where it will be
        try:
            out[str(p)] = shutil.disk_usage(probe_path).free
        except OSError:
            pass
    return out


def _port_state(port: int) -> tuple[bool, str | None]:
    """(free, what answers there when it is not)."""
    if port_free(port):
        return True, None
    return False, what_answers(port, os.environ.get("VLKIT_API_KEY"))


def default_models(options: Options) -> dict[str, str]:
    """The model each profile would serve: --model, else the plan options' default (VLKIT_MODEL,
    else the service's default), the same for `vlkit plan` and `vlkit up`."""
    from scripts.planner.options import default_model

    model = options.model or default_model()
    return {"8gb": model, "16gb": model}


def service_settings():
    """(ServiceSettings from the environment, None) or, when a VLKIT_* variable is malformed, (the
    defaults with VLKIT_MODEL kept, what is wrong): the doctor reports it instead of crashing."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError
    from service.settings import ENV_PREFIX, ServiceSettings

    try:
        return ServiceSettings(), None
    except ValidationError as exc:
        why = "; ".join(f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
    except SettingsError as exc:  # VLKIT_ENV_FILE's file missing, unreadable or malformed
        why = str(exc)
    model = os.environ.get(f"{ENV_PREFIX}MODEL") or ServiceSettings.model_fields["model"].default
    return ServiceSettings.model_construct(model=model), why


def _plans(gpu: GpuProbe, models: dict[str, str]) -> dict[str, object]:
    if not gpu.gpus:
        return {}
    try:
        from scripts.planner import plan_for
    except ImportError as exc:
        return {p: f"planner not available ({exc})" for p in models}
    out: dict[str, object] = {}
    for profile, model in models.items():
        try:
            out[profile] = plan_for(model=model, profile=profile, gpus=gpu.gpus)
        except (ValueError, FileNotFoundError, LookupError) as exc:  # what `vlkit up` refuses the model for
            out[profile] = ModelProblem(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal to the doctor
            out[profile] = f"{type(exc).__name__}: {exc}"
    return out


class ModelProblem(str):
    """Why the planner cannot plan the model at all (unknown id, a folder that is not a checkpoint):
    `vlkit up` refuses it the same way."""


def collect(options: Options) -> Facts:
    from scripts.doctor import docker as docker_checks  # the container check's cache lives there

    platform = detect_platform()
    docker = shutil.which("docker")
    models = default_models(options)
    settings, settings_error = service_settings()  # malformed VLKIT_*: defaults, and the error reported
    cache = hub_cache()
    with ThreadPoolExecutor(max_workers=8) as pool:
        f_gpu = pool.submit(probe, QUICK_TIMEOUT_S)
        f_ld = pool.submit(_ldconfig)
        f_docker = pool.submit(_docker_info, docker)
        f_wslcfg = pool.submit(_wslconfig, platform, options.wslconfig)
        f_ram = pool.submit(host_ram, QUICK_TIMEOUT_S)
        f_interop = pool.submit(interop_enabled) if platform.is_wsl else None
        port = options.port or settings.port
        f_port = pool.submit(_port_state, port)
        f_cached = {m: pool.submit(model_in_cache, m, cache) for m in set(models.values())}
        gpu = f_gpu.result()
        f_plans = pool.submit(_plans, gpu, models)
        docker_info = f_docker.result()
        root = docker_checks.docker_root_dir(docker_info)
        f_disk = pool.submit(_disk_free, [cache] + ([Path(root)] if root else []))
        wsl_path, wsl_cfg, wsl_err = f_wslcfg.result()
        port_is_free, port_holder = f_port.result()
        facts = Facts(
            platform=platform, systemd=systemd_running(), gpu=gpu, ldconfig=f_ld.result(),
            docker_path=docker, docker_info=docker_info,
            interop=f_interop.result() if f_interop else False,
            wslconfig_path=wsl_path, wslconfig=wsl_cfg, wslconfig_error=wsl_err, wslconfig_given=options.wslconfig is not None,
            host_ram=f_ram.result(), hf_cache=cache, disk_free=f_disk.result(),
            port=port, port_free=port_is_free, port_holder=port_holder,
            models=models, model_given=options.model, settings_error=settings_error,
            model_cached={m: f.result() for m, f in f_cached.items()}, plans=f_plans.result(),
        )
    facts.gpu_container = docker_checks.container_gpu_result(facts, run_now=options.gpu_container)
    return facts


