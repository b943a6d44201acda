"""The doctor's checks judged from recorded facts (WSL2 + an 8 GB card, Docker states), and the doctor
run for real on this machine (not WSL, no GPU)."""
from __future__ import annotations

import codecs
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts import gpu
from scripts.doctor import docker, driver, planning, storage, system
from scripts.doctor import facts as facts_module
from scripts.doctor.facts import CommandResult, Facts, Options
from scripts.doctor.run import judge, ready
from tests.doctor_helpers import DATA, PUBLIC, h100_smi, read, run_cli
from wsl import wslconfig
from wsl.host import HostRam, Platform

MIB = 2 ** 20
WSL2 = Platform("wsl2", "5.15.167.4-microsoft-standard-WSL2", "")
INFO_UP = CommandResult(0, read(DATA / "docker" / "info-engine-debian.json"), "")
INFO_DOWN = CommandResult(1, read(DATA / "docker" / "info-daemon-down.json"), read(DATA / "docker" / "info-daemon-down.stderr"))


def wsl_rtx3070() -> gpu.GpuProbe:
    """The WSL2 RTX 3070 of a published `nvidia-smi` (2880 MiB of 8192 MiB in use)."""
    driver_version, cuda = gpu.parse_smi_header(read(PUBLIC / "wsl2-rtx3070-nvidia-smi.txt"))
    info = gpu.GpuInfo(0, "NVIDIA GeForce RTX 3070", None, 8192 * MIB, (8192 - 2880) * MIB, 2880 * MIB,
                       driver_version, cuda, (8, 6), [gpu.GpuProcess(41, "/Xwayland", None)])
    return gpu.GpuProbe([info], "nvidia-smi", "/usr/lib/wsl/lib/nvidia-smi")


def facts(**kw) -> Facts:
    base = dict(platform=WSL2, systemd=True, gpu=wsl_rtx3070(), ldconfig=read(PUBLIC / "wsl2-ldconfig-libcuda.txt"),
                docker_path=shutil.which("docker") or "/usr/bin/docker", docker_info=INFO_UP, interop=True,
                host_ram=HostRam(32 * 2 ** 30, "Windows (Win32_ComputerSystem)"), hf_cache=None,
                disk_free={"/home/u/.cache/huggingface/hub": 200 * 2 ** 30}, port_free=True,
                models={"8gb": "Qwen/Qwen3-VL-2B-Instruct", "16gb": "Qwen/Qwen3-VL-2B-Instruct"},
                model_cached={"Qwen/Qwen3-VL-2B-Instruct": True})
    base.update(kw)
    return Facts(**base)


def by_name(checks):
    return {c.name: c for c in checks}


def test_old_windows_driver_blocks_with_the_driver_to_install():
    c = driver.driver_check(facts(), "8gb")
    assert c.status == "fail" and c.blocking
    assert "526.98, CUDA up to 12.0" in c.found and "needs CUDA 13.0" in c.found
    assert "Windows NVIDIA driver to 580.88 or newer" in c.fix


def test_recent_driver_passes(monkeypatch, tmp_path):
    h100_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    f = facts(platform=Platform("linux", "6.8.0", ""), gpu=gpu.probe())
    c = driver.driver_check(f, "auto")
    assert c.status == "ok" and "580.159.04, CUDA up to 13.0" in c.found
    g = driver.gpu_check(f, "auto")
    assert g.status == "ok" and "NVIDIA H100 80GB HBM3: 79.6 GiB total, 79.2 GiB free, compute 9.0" in g.found


def test_vram_held_by_others_is_a_warning_with_names(monkeypatch):
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")  # the fix in the words of the make user
    c = driver.vram_check(facts())
    assert c.status == "warn" and "2.8 GiB of 8.0 GiB in use" in c.found
    assert "Xwayland (pid 41)" in c.found and "WSL does not report per-process sizes" in c.found
    assert "make wsl-restart" in c.fix


def test_wsl_libcuda_real_listing_ok_and_shadowed_fails():
    assert driver.wsl_libcuda_check(facts()).status == "ok"
    shadowed = read(PUBLIC / "wsl2-ldconfig-libcuda.txt") + \
        "        libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
    c = driver.wsl_libcuda_check(facts(ldconfig=shadowed))
    assert c.status == "fail" and "/usr/lib/x86_64-linux-gnu/libcuda.so.1" in c.found
    assert driver.wsl_libcuda_check(facts(platform=Platform("linux", "6.8", ""))) is None


def test_docker_engine_without_nvidia_runtime():
    checks = by_name(docker.checks(facts()))
    assert checks["docker"].status == "ok" and "(inside WSL)" in checks["docker"].found
    assert checks["compose"].status == "ok" and "v2.40.3" in checks["compose"].found
    gpu_rt = checks["docker-gpu"]
    assert gpu_rt.status == "fail" and gpu_rt.blocking and "nvidia-ctk runtime configure" in gpu_rt.fix


def test_a_stopped_engine_on_plain_linux_is_not_told_about_wsl_conf():
    fix = docker.explain_daemon_error("Cannot connect to the Docker daemon", False, False, wsl=False)
    assert fix == "start the engine: `sudo service docker start`"
    assert "/etc/wsl.conf" in docker.explain_daemon_error("Cannot connect to the Docker daemon", False, False, wsl=True)


def test_docker_daemon_down():
    checks = by_name(docker.checks(facts(docker_info=INFO_DOWN, systemd=True)))
    assert checks["docker"].status == "fail"
    assert "Cannot connect to the Docker daemon" in checks["docker"].found
    assert "systemctl enable --now docker" in checks["docker"].fix
    assert checks["compose"].status == "ok"  # the CLI plugin is there even with the daemon down
    assert "docker-gpu" not in checks


def test_docker_desktop_has_gpu_support():
    info = json.loads(INFO_UP.stdout)
    info["OperatingSystem"] = "Docker Desktop"
    assert docker.is_docker_desktop(info)
    assert docker.gpu_runtime(info) == "Docker Desktop (built-in GPU support)"
    assert docker.gpu_runtime({**json.loads(INFO_UP.stdout), "Runtimes": {"nvidia": {}, "runc": {}}}) == "nvidia runtime"


@pytest.mark.parametrize("name", ["docker-run-gpus-no-runtime.txt", "compose-up-no-nvidia-driver.txt"])
def test_real_gpu_run_errors_are_explained(name):
    found, fix = docker.explain_gpu_run_error(read(PUBLIC / name))
    assert "could not select device driver" in found
    assert "nvidia-container-toolkit" in fix


def test_wslconfig_check_states(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")  # the fixes in the words of the make user
    path = tmp_path / ".wslconfig"
    small = facts(wslconfig_path=path, wslconfig=wslconfig.load(path))
    c = system.wslconfig_check(small, "8gb")
    assert c.status == "warn" and "not found" in c.found and "memory=24GB swap=8GB" in c.found
    path.write_text("[wsl2]\nmemory=4GB\n")
    c = system.wslconfig_check(facts(wslconfig_path=path, wslconfig=wslconfig.load(path)), "16gb")
    assert c.status == "warn" and "under the 12.0 GiB the 16gb profile needs" in c.found
    assert "make wsl-config" in c.fix
    path.write_text("[wsl2]\nmemory=24GB\nswap=8GB\n")
    assert system.wslconfig_check(facts(wslconfig_path=path, wslconfig=wslconfig.load(path)), "16gb").status == "ok"
    c = system.wslconfig_check(facts(wslconfig_path=path, wslconfig=None, wslconfig_error="line 2 is not ..."), "8gb")
    assert c.status == "warn" and "line 2" in c.found


def test_wslconfig_on_a_small_pc_is_judged_by_what_the_pc_can_give(tmp_path):
    """An 8 GB PC: `wsl config` writes memory=6GB, and the doctor says why that is all there is
    instead of sending the user back to `wsl config` (which has nothing to change)."""
    path = tmp_path / ".wslconfig"
    path.write_text("[wsl2]\nmemory=6GB\nswap=4GB\n")
    pc = HostRam(8 * 2 ** 30, "Windows (Win32_ComputerSystem)")
    c = system.wslconfig_check(facts(wslconfig_path=path, wslconfig=wslconfig.load(path), host_ram=pc), "8gb")
    assert c.status == "warn" and "this PC has 8 GB of RAM" in c.found and c.fix is None
    for text, said in (("[wsl2]\nmemory=4GB\nswap=4GB\n", "under the 6.0 GiB"),  # less than it can give
                       ("[wsl2]\nswap=4GB\n", "under the 6.0 GiB"),  # no memory=: WSL gives half, 4 GB
                       ("[wsl2]\nmemory=6GB\nswap=0\n", "no swap"), ("[wsl2]\nmemory=6GB\nprocessors=1\n", "one processor"),
                       ("[wsl2]\nmemory=6GB\nswap=4 GB\n", "WSL rejects swap='4 GB'")):  # what the fix changes: said
        path.write_text(text)
        rows = system.wslconfig_checks(facts(wslconfig_path=path, wslconfig=wslconfig.load(path), host_ram=pc), "8gb")
        c = next(r for r in rows if said in r.found)
        assert c.status == "warn" and "wsl config" in c.fix, (text, c)


@pytest.mark.parametrize("memory", ["-1", "64GB"])
def test_wslconfig_memory_above_the_pcs_ram_is_a_warning(tmp_path, memory):
    path = tmp_path / ".wslconfig"
    path.write_text(f"[wsl2]\nmemory={memory}\nswap=8GB\n")
    c = system.wslconfig_check(facts(wslconfig_path=path, wslconfig=wslconfig.load(path)), "8gb")
    assert c.status == "warn" and "more than this PC's 32.0 GiB of RAM" in c.found, c.found


def test_a_wslconfig_the_user_named_is_the_one_the_fixes_edit(tmp_path):
    path = tmp_path / "my.wslconfig"
    path.write_text("[wsl2]\nmemory=4GB\n")
    c = system.wslconfig_check(facts(wslconfig_path=path, wslconfig=wslconfig.load(path), wslconfig_given=True), "8gb")
    assert f"vlkit wsl config --wslconfig {path}" in c.fix
    windows = Path(r"C:\Users\Jane Doe\.wslconfig")
    _, cfg, error = facts_module._wslconfig(Platform("wsl2", "6.6", ""), windows)
    assert cfg is None and error == "a Windows path; in WSL it is /mnt/c/Users/Jane Doe/.wslconfig"
    c = system.wslconfig_check(facts(wslconfig_path=windows, wslconfig=None, wslconfig_error=error, wslconfig_given=True),
                               "8gb")
    assert c.fix == "`vlkit doctor --wslconfig '/mnt/c/Users/Jane Doe/.wslconfig'`", c.fix


@pytest.mark.parametrize("text, status, found", [
    # the doctor reports the value WSL applies, read by WSL's own rules (wsl/wslconfig_parser.py)
    ("[wsl2]\nmemory=24GB#was 8GB\nswap=8GB\n", "ok", "memory=24GB swap=8GB"),
    ("[wsl2]\nmemory=4GB\nmemory=24GB\n", "warn", "under the 12.0 GiB"),  # the first one counts
    ("[wsl2]\nmemory=24GB ; was 8GB\n", "warn", "WSL rejects memory='24GB ; was 8GB' and uses its default"),
    ("[wsl2]\nmemory=24gb\n", "warn", "WSL rejects memory='24gb'"),
    ("[ wsl2 ]\nmemory=24GB\n", "warn", "WSL skips `[ wsl2 ]`"),
    ("[ wsl2 ]\nmemory=24GB\n", "warn", "memory=default"),
    ("[experimental]\nmemory=24GB\n", "warn", "`memory` is [experimental]; WSL reads it only from [wsl2]"),
    ("[wsl2]\nmemory=24GB\nswap=0\n", "warn", "no swap"),
    ("[wsl2]\nmemory=24GB\nprocessors=0x1\n", "warn", "one processor"),
    ("# a\u2028b\x0c\n[wsl2]\r\nmemory=24GB\r\nswap=8GB\r\n", "ok", "memory=24GB swap=8GB"),
])
def test_wslconfig_check_reads_what_wsl_applies(tmp_path, text, status, found):
    """The verdict, then one row per line WSL skips, ignores or rejects (one problem a line)."""
    path = tmp_path / ".wslconfig"
    path.write_bytes(text.encode())
    rows = system.wslconfig_checks(facts(wslconfig_path=path, wslconfig=wslconfig.load(path)), "16gb")
    assert ("warn" if any(r.status == "warn" for r in rows) else "ok") == status
    assert any(found in r.found for r in rows), [r.found for r in rows]
    assert all(r.found.count("WSL ") <= 1 for r in rows)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "it is a folder: name the file in it"),
    (lambda p: p.write_bytes(codecs.BOM_UTF16_BE + "[wsl2]\n".encode("utf-16-be")), "big-endian, which WSL cannot open"),
    (lambda p: p.write_bytes("[wsl2]\nmemory=24GB\n".encode("utf-16-le")), "WSL reads it as UTF-8 and finds no settings"),
])
def test_wslconfig_check_names_files_wsl_cannot_read(tmp_path, make, message):
    path = tmp_path / ".wslconfig"
    make(path)
    got_path, cfg, error = facts_module._wslconfig(WSL2, path)
    c = system.wslconfig_check(facts(wslconfig_path=got_path, wslconfig=cfg, wslconfig_error=error), "8gb")
    assert c.status == "warn" and message in c.found and str(path) in c.found


def test_a_vlkit_env_file_the_service_would_refuse_is_reported_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("VLKIT_ENV_FILE", str(tmp_path / "missing.env"))
    settings, why = facts_module.service_settings()
    assert settings.port == 8000 and why == f"VLKIT_ENV_FILE {tmp_path / 'missing.env'}: cannot read it: No such file or directory"


def test_platform_checks_wsl1_and_systemd():
    wsl1 = Platform("wsl1", "4.4.0-18985-Microsoft", read(PUBLIC / "proc-version-wsl1-18985.txt"))
    rows = by_name(system.platform_checks(facts(platform=wsl1, systemd=False)))
    assert rows["platform"].status == "fail" and rows["platform"].blocking and "--set-version" in rows["platform"].fix
    assert rows["systemd"].status == "warn" and "systemd=true" in rows["systemd"].fix
    old = Platform("wsl2", "5.4.72-microsoft-standard-WSL2", "")
    assert by_name(system.platform_checks(facts(platform=old)))["kernel"].status == "fail"


def test_plan_verdicts():
    fits = SimpleNamespace(fits=True, model="Qwen/Qwen3-VL-2B-Instruct", context=8192, refusal=None)
    no = SimpleNamespace(fits=False, model="Qwen/Qwen3-VL-8B-Instruct", context=0, refusal="needs 17.2 GiB, 7.9 GiB free")
    rows = by_name(planning.plan_checks(facts(plans={"8gb": fits, "16gb": no}), "8gb"))
    assert rows["plan-8gb"].status == "ok" and "context 8192" in rows["plan-8gb"].found
    assert rows["plan-16gb"].status == "warn" and not rows["plan-16gb"].blocking
    rows = by_name(planning.plan_checks(facts(plans={"8gb": fits, "16gb": no}), "16gb"))
    assert rows["plan-16gb"].status == "fail" and rows["plan-16gb"].blocking
    rows = by_name(planning.plan_checks(facts(plans={"8gb": no, "16gb": no}), "auto"))
    assert rows["plan"].blocking


def test_a_model_the_planner_cannot_read_is_one_blocking_row_with_what_to_give(monkeypatch, tmp_path):
    """A folder that is not a checkpoint (as `vlkit up` refuses it): one blocking `model` row, with
    the planner's reason and no Python class names; the cache row does not offer to download a folder."""
    from scripts.doctor.facts import _plans

    bad = tmp_path / "models" / "empty"
    bad.mkdir(parents=True)
    h100_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    probe = gpu.probe()
    models = {"8gb": str(bad), "16gb": str(bad)}
    f = facts(gpu=probe, models=models, plans=_plans(probe, models), model_cached={str(bad): False})
    rows = planning.plan_checks(f, "auto")
    assert [(r.name, r.status, r.blocking) for r in rows] == [("model", "fail", True)]
    assert f"cannot plan for {bad}: {bad} has no config.json" == rows[0].found and "Error" not in rows[0].found
    assert "Qwen/Qwen3-VL-2B-Instruct" in rows[0].fix
    cache = storage.model_cache_check(f)
    assert "download" not in cache.fix and "not a model folder (no config.json in it)" in cache.found
    gone = facts(models={"8gb": str(tmp_path / "nowhere"), "16gb": str(tmp_path / "nowhere")}, model_cached={})
    assert "not a model folder (no such folder)" in storage.model_cache_check(gone).found


def test_whole_judgement_wsl_machine_is_not_ready_for_the_right_reasons():
    checks = judge(facts(), Options(profile="8gb"))
    assert not ready(checks)
    assert sorted(c.name for c in checks if c.blocking) == ["docker-gpu", "driver"]


def test_doctor_on_this_machine_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = run_cli(["doctor", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 1
    assert all(set(r) == {"name", "status", "found", "fix", "blocking"} for r in rows)
    assert all(r["status"] in ("ok", "warn", "fail") for r in rows)
    got = {r["name"]: r for r in rows}
    assert got["platform"]["status"] == "ok" and got["platform"]["found"] == "native Linux"
    assert got["wslconfig"]["status"] == "ok" and "not WSL" in got["wslconfig"]["found"]
    assert got["driver"]["status"] == "fail" and got["driver"]["blocking"]
    assert "nvidia-smi not found" in got["driver"]["found"] and "ubuntu-drivers" in got["driver"]["fix"]
    assert got["gpu"]["status"] == "fail" and got["gpu"]["blocking"]
    assert "wsl-libcuda" not in got and "vram" not in got
    assert {"docker", "disk", "model-cache", "port", "plan-8gb", "plan-16gb"} <= set(got)


def test_doctor_on_this_machine_human(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert run_cli(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "Not ready" in out and "driver" in out and "FAIL" in out


def test_recorded_local_gpu_run_error_is_explained():
    found, fix = docker.explain_gpu_run_error(read(DATA / "docker" / "run-gpus-no-runtime.stderr"))
    assert found.startswith("Docker has no NVIDIA GPU driver") and "nvidia-ctk" in fix


def _local_image() -> str | None:
    import subprocess
    if not shutil.which("docker"):
        return None
    r = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True, timeout=10)
    names = [n for n in r.stdout.split() if "<none>" not in n] if r.returncode == 0 else []
    return names[0] if names else None


def test_gpu_container_check_against_the_real_engine(monkeypatch, tmp_path):
    """With a real Docker engine and no NVIDIA runtime, `docker run --gpus all` fails the way users see it;
    the result is cached and reused by the next, quick doctor run."""
    image = _local_image()
    if image is None:
        pytest.skip("no Docker engine with a local image here")
    from scripts.doctor.facts import run
    live = run([shutil.which("docker"), "info", "--format", "{{json .}}"])
    if live.returncode != 0:
        pytest.skip("Docker daemon not reachable")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(docker, "_candidate_images", lambda: [image])
    f = facts(platform=Platform("linux", "6.8", ""), docker_info=live, docker_path=shutil.which("docker"))
    if "nvidia" in (json.loads(live.stdout).get("Runtimes") or {}):
        pytest.skip("this engine has an NVIDIA runtime")
    result = docker.container_gpu_result(f, run_now=True)
    assert result.status == "fail" and "could not select device driver" in result.found
    cached = docker.container_gpu_result(f, run_now=False)
    assert cached.cached and cached.found == result.found
    row = by_name(docker.checks(facts(docker_info=live, gpu_container=cached)))["gpu-in-container"]
    assert row.status == "fail" and row.found.endswith("(cached)")


@pytest.mark.parametrize("environ, status, blocking", [
    ({}, "ok", False),
    ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, "fail", True),
    ({"VLLM_USE_V2_MODEL_RUNNER": "1", "VLLM_WSL2_ENABLE_PIN_MEMORY": "1"}, "ok", False),
])
def test_wsl2_vllm_runner_check(environ, status, blocking):
    from scripts.doctor.vllm_runner import vllm_runner_check

    c = vllm_runner_check(facts(), "16gb", environ)
    assert c.status == status and c.blocking == blocking
    assert vllm_runner_check(facts(), "8gb", environ) is None                          # the service: no vLLM
    assert vllm_runner_check(facts(platform=Platform("linux", "6.8.0", "")), "16gb", environ) is None
    assert "UVA is not available" in c.found if status == "fail" else "V1" in c.found or "V2" in c.found


def test_doctor_saved_to_a_file_keeps_each_fix_on_one_line(capsys, monkeypatch, tmp_path):
    """`make doctor > doctor.txt` (to share, or a CI log): a fix's command is never broken over lines."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("VLKIT_VIA_MAKE", raising=False)
    run_cli(["doctor"])
    lines = capsys.readouterr().out.splitlines()
    assert any("→ install the NVIDIA driver (Ubuntu: `sudo ubuntu-drivers install`), then reboot" in line
               for line in lines), "\n".join(lines)
    assert any("`vlkit plan --profile 16gb --gpu-memory 16GiB`" in line for line in lines)


def test_without_a_gpu_each_plan_row_shows_a_plan_for_its_own_profile(monkeypatch):
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")
    rows = by_name(planning.plan_checks(facts(gpu=gpu.GpuProbe([], None, None, "nvidia-smi not found")), "auto"))
    assert "`make plan PROFILE=8gb GPU_MEMORY=8GiB`" in rows["plan-8gb"].fix
    assert "`make plan PROFILE=16gb GPU_MEMORY=16GiB`" in rows["plan-16gb"].fix


def test_doctor_checks_the_port_it_is_given(capsys, monkeypatch, tmp_path):
    """`make doctor PORT=8011` checks 8011, the port `make up PORT=8011` would publish."""
    import socket

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run_cli(["doctor", "--json", "--port", str(port)])
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["port"]
    assert row["status"] == "warn" and f"127.0.0.1:{port} is in use" in row["found"]


def test_the_doctors_fixes_keep_the_model_the_user_named(monkeypatch):
    """`make doctor MODEL=Qwen/Qwen3-VL-4B-Instruct-FP8`: the commands it offers plan, serve and
    download that model, not the default one."""
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")
    model = "Qwen/Qwen3-VL-4B-Instruct-FP8"
    named = dict(models={"8gb": model, "16gb": model}, model_cached={model: False}, model_given=model)
    rows = by_name(planning.plan_checks(facts(gpu=gpu.GpuProbe([], None, None, "nvidia-smi not found"), **named),
                                        "auto"))
    assert f"`make plan PROFILE=8gb MODEL={model} GPU_MEMORY=8GiB`" in rows["plan-8gb"].fix, rows["plan-8gb"].fix
    no = SimpleNamespace(fits=False, model=model, context=0, refusal="needs 7.2 GiB, 6.8 GiB free")
    rows = by_name(planning.plan_checks(facts(plans={"8gb": no, "16gb": no}, **named), "auto"))
    assert f"`make plan PROFILE=8gb MODEL={model}` shows the budget" in rows["plan-8gb"].fix
    assert f"`make plan MODEL={model}` shows the next step" in rows["plan"].fix
    cache = storage.model_cache_check(facts(**named))
    assert f"`make up MODEL={model}` downloads it first" in cache.fix, cache.fix


def test_the_port_row_names_what_holds_the_port(capsys, monkeypatch, tmp_path, server):
    """`make doctor PORT=N` where a service already answers: the row says what answers (as `make up`
    does), not 'vlkit already running?', and offers a port that is free."""
    from tests.conftest import API_KEY, SERVED_NAME

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("VLKIT_API_KEY", API_KEY)
    port = int(server.base_url.rsplit(":", 1)[1])
    run_cli(["doctor", "--json", "--port", str(port)])
    row = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["port"]
    assert row["status"] == "warn"
    assert row["found"] == f"127.0.0.1:{port} is in use by vlkit's service (model {SERVED_NAME}, ready)", row["found"]
    offered = int(row["fix"].rsplit("--port ", 1)[1].strip("`"))
    from scripts.stack.client import port_free
    assert offered > port and port_free(offered), row["fix"]
