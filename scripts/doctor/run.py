"""Run every doctor check: gather facts concurrently, then judge them."""
from __future__ import annotations

from scripts.doctor import docker, driver, planning, storage, system
from scripts.doctor.vllm_runner import vllm_runner_check
from scripts.doctor.facts import Facts, Options, collect
from scripts.doctor.model import Check


def judge(facts: Facts, options: Options) -> list[Check]:
    """All checks, in the order a person fixes things: platform, driver, Docker, disk, plan (pure)."""
    rows: list[Check | None] = [
        *system.platform_checks(facts),
        *system.wslconfig_checks(facts, options.profile),
        driver.driver_check(facts, options.profile),
        driver.gpu_check(facts, options.profile),
        driver.vram_check(facts),
        driver.wsl_libcuda_check(facts),
        *docker.checks(facts),
        storage.disk_check(facts),
        storage.model_cache_check(facts),
        storage.port_check(facts),
        system.settings_check(facts),
        vllm_runner_check(facts, options.profile),
        *planning.plan_checks(facts, options.profile),
    ]
    return [r for r in rows if r is not None]


def run_checks(options: Options) -> list[Check]:
    return judge(collect(options), options)


def ready(checks: list[Check]) -> bool:
    return not any(c.blocking for c in checks)
