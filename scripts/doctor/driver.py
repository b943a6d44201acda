"""NVIDIA driver and GPU checks: driver and CUDA version against our images, the GPU and its VRAM,
the processes holding VRAM, and a Linux driver wrongly installed inside WSL."""
from __future__ import annotations

import re

from scripts import images
from scripts.doctor.model import Check, fail, gib, ok, warn
from scripts.usage import command

WSL_LIB_PREFIX = "/usr/lib/wsl/"
BUSY_SHARE = 0.15  # other programs holding more than this share of VRAM is worth a warning


def parse_ldconfig_libcuda(text: str) -> list[str]:
    """Paths of libcuda.so* in `ldconfig -p` output (pure), in the loader's order."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(libcuda\.so(?:\.\d+)*)\s+\(.*\)\s+=>\s+(\S+)", line)
        if m:
            out.append(m.group(2))
    return out


def _version(v: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v or ""))


def _no_driver_fix(platform) -> str:
    if platform.is_wsl:
        return ("install the NVIDIA driver in Windows (GeForce/Studio, it includes WSL support), then `wsl --shutdown`; "
                "never install a Linux NVIDIA driver inside WSL")
    return "install the NVIDIA driver (Ubuntu: `sudo ubuntu-drivers install`), then reboot"


def driver_check(facts, profile: str) -> Check:
    gpus = facts.gpu.gpus
    if not gpus:
        return fail("driver", f"no NVIDIA driver answered ({facts.gpu.error})", _no_driver_fix(facts.platform))
    g = gpus[0]
    via = "NVML" if facts.gpu.source == "nvml" else f"nvidia-smi ({facts.gpu.nvidia_smi})"
    found = f"{g.driver_version}, CUDA up to {g.cuda_driver_version or '?'} (via {via})"
    profiles = ("8gb", "16gb") if profile == "auto" else (profile,)
    needs = {p: images.cuda_for(p) for p in profiles}
    if g.cuda_driver_version is None:
        return warn("driver", found + f"; cannot tell if it runs CUDA {max(needs.values(), key=_version)}",
                    "update the NVIDIA driver")
    short = [p for p, c in needs.items() if not images.cuda_supported_by(g.cuda_driver_version, c)]
    if not short:
        return ok("driver", found + f"; images need CUDA {', '.join(sorted(set(needs.values())))}")
    need = needs[short[0]]
    side = "windows" if facts.platform.is_wsl else "linux"
    min_driver = images.MIN_DRIVER.get(need, {}).get(side)
    where = "the Windows NVIDIA driver" if facts.platform.is_wsl else "the NVIDIA driver"
    fix = f"update {where} to {min_driver} or newer" if min_driver else f"update {where}"
    blocking = len(short) == len(profiles)  # auto still has a profile when only one image is out of reach
    return fail("driver", found + f"; the {', '.join(short)} image needs CUDA {need}", fix, blocking=blocking)


def gpu_check(facts, profile: str) -> Check:
    gpus = facts.gpu.gpus
    if not gpus:
        return fail("gpu", "no NVIDIA GPU visible", "see the driver line above")
    parts = []
    for g in gpus:
        cc = f", compute {g.compute_capability[0]}.{g.compute_capability[1]}" if g.compute_capability else ""
        parts.append(f"GPU {g.index} {g.name}: {gib(g.total_bytes)} total, {gib(g.free_bytes)} free{cc}")
    found = "; ".join(parts) + (" (vlkit uses GPU 0)" if len(gpus) > 1 else "")
    cc = gpus[0].compute_capability
    if cc and profile in ("8gb", "auto") and cc < images.SERVICE_MIN_COMPUTE_CAPABILITY:
        need = ".".join(map(str, images.SERVICE_MIN_COMPUTE_CAPABILITY))
        return fail("gpu", found + f"; older than compute {need}, which the images' CUDA build needs",
                    "use a Turing (RTX 20xx) or newer card", blocking=True)
    return ok("gpu", found)


def vram_check(facts) -> Check | None:
    gpus = facts.gpu.gpus
    if not gpus:
        return None
    g = gpus[0]
    used = g.total_bytes - g.free_bytes
    names = []
    for p in sorted(g.processes, key=lambda p: -(p.used_bytes or 0)):
        size = f" {p.used_bytes / 1024 ** 2:.0f} MiB" if p.used_bytes is not None else ""
        names.append(f"{p.name.rsplit('/', 1)[-1] or p.name} (pid {p.pid}{size})")
    who = ", ".join(names) if names else "no process listed"
    if facts.platform.is_wsl and names and all(p.used_bytes is None for p in g.processes):
        who += "; WSL does not report per-process sizes"
    found = f"{gib(used)} of {gib(g.total_bytes)} in use on GPU 0: {who}"
    if used > BUSY_SHARE * g.total_bytes:
        fix = "close GPU programs (browsers, Discord, games, a stuck server)"
        fix += f"; `{command('wsl-restart')}` frees what WSL holds" if facts.platform.is_wsl else ""
        return warn("vram", found, fix)
    return ok("vram", found)


def wsl_libcuda_check(facts) -> Check | None:
    """Under WSL the only right libcuda is the one in /usr/lib/wsl/lib; a Linux driver package puts
    another one first and breaks CUDA in WSL and in containers."""
    if not facts.platform.is_wsl:
        return None
    if facts.ldconfig is None:
        return warn("wsl-libcuda", "cannot read `ldconfig -p`", None)
    paths = parse_ldconfig_libcuda(facts.ldconfig)
    foreign = [p for p in paths if not p.startswith(WSL_LIB_PREFIX)]
    if foreign:
        return fail("wsl-libcuda", f"a Linux NVIDIA driver's libcuda is installed inside WSL: {', '.join(foreign)}",
                    "remove it (`sudo apt-get remove --purge '^nvidia-driver-.*' '^libnvidia-compute-.*'`) and keep only "
                    "/usr/lib/wsl/lib; then `sudo ldconfig`", blocking=False)
    if not paths:
        return warn("wsl-libcuda", "no libcuda in the loader cache",
                    "`sudo ldconfig` (WSL's /etc/ld.so.conf.d/ld.wsl.conf lists /usr/lib/wsl/lib)")
    return ok("wsl-libcuda", f"only WSL's libcuda ({paths[0]})")
