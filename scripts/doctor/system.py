"""Platform checks: WSL2 / WSL1 / Linux, kernel, systemd, and the Windows .wslconfig."""
from __future__ import annotations

from scripts.doctor.model import Check, fail, gib, ok, warn
from scripts.usage import command, setting
from wsl import wslconfig, wslconfig_parser
from wsl.host import is_windows_path, kernel_version, windows_to_wsl_path

# NVIDIA's CUDA on WSL guide: GPU compute needs a WSL2 kernel of 5.10.43.3 or later.
MIN_WSL_KERNEL = (5, 10, 43, 3)


def platform_checks(facts) -> list[Check]:
    p = facts.platform
    out: list[Check] = []
    if p.kind == "wsl1":
        out.append(fail("platform", f"WSL 1 ({p.kernel}): no GPU access",
                        "convert this distro in PowerShell: `wsl --set-version <distro> 2` (list them with `wsl -l -v`)"))
    elif p.kind == "wsl2":
        out.append(ok("platform", "WSL 2"))
    else:
        out.append(ok("platform", "native Linux"))

    version = kernel_version(p.kernel)
    if p.kind == "wsl2" and version and version < MIN_WSL_KERNEL:
        out.append(fail("kernel", f"{p.kernel}: older than 5.10.43.3, no CUDA in WSL",
                        "update WSL in PowerShell: `wsl --update`, then `wsl --shutdown`"))
    else:
        out.append(ok("kernel", p.kernel or "unknown"))

    if facts.systemd:
        out.append(ok("systemd", "running"))
    elif p.is_wsl:
        out.append(warn("systemd", "not running: Docker Engine inside WSL will not start by itself",
                        f"add `[boot]` `systemd=true` to /etc/wsl.conf, then `{command('wsl-restart')}` "
                        "(not needed with Docker Desktop)"))
    else:
        out.append(warn("systemd", "not PID 1 (a container?): services such as docker are started by hand",
                        "start the Docker daemon yourself (`sudo dockerd &` or your init system)"))
    return out


def settings_check(facts) -> Check | None:
    """VLKIT_* variables in this shell that ServiceSettings rejects (only shown when there are some)."""
    if not facts.settings_error:
        return None
    return warn("settings", f"malformed VLKIT_* variable(s), defaults used: {facts.settings_error}",
                "fix or unset them (`unset VLKIT_...`); service/settings.py lists the valid values")


def _named_file(facts) -> dict:
    """`--wslconfig PATH` for the fixes' commands when the user named the file: they edit that one."""
    return {"wslconfig": facts.wslconfig_path} if facts.wslconfig_given else {}


def wslconfig_checks(facts, profile: str) -> list[Check]:
    """The .wslconfig's verdict, then one row for each line WSL will skip, ignore or reject."""
    rows = [wslconfig_check(facts, profile)]
    cfg = facts.wslconfig
    if cfg is not None and cfg.exists and not facts.wslconfig_error:
        fix = f"fix the line by hand, or `{command('wsl-config', **_named_file(facts))}` (it rewrites values WSL rejects)"
        rows += [warn("wslconfig", f"{cfg.path}: {note}", fix) for note in wslconfig.findings(cfg)]
    return rows


def wslconfig_check(facts, profile: str) -> Check:
    name = "wslconfig"
    if not facts.platform.is_wsl and facts.wslconfig_path is None:
        return ok(name, "not WSL: no .wslconfig involved")
    given = _named_file(facts)
    if facts.wslconfig_path is not None and is_windows_path(facts.wslconfig_path):
        return warn(name, f"{facts.wslconfig_path}: {facts.wslconfig_error}",
                    f"`{command('doctor', wslconfig=windows_to_wsl_path(str(facts.wslconfig_path)))}`")
    if facts.wslconfig_error:
        where = f"{facts.wslconfig_path}: " if facts.wslconfig_path else ""
        return warn(name, f"{where}{facts.wslconfig_error}",
                    f"fix the file by hand, or give another: {setting('wslconfig', 'PATH')}; "
                    f"`{command('wsl-config', dry_run=True, **given)}` shows what we would write")
    cfg = facts.wslconfig
    if cfg is None:
        return warn(name, "the Windows profile folder is out of reach, so .wslconfig was not read",
                    f"`{command('doctor', wslconfig='/mnt/c/Users/<you>/.wslconfig')}`")
    profile = profile if profile in wslconfig.PROFILE_MIN_VM_GIB else "8gb"
    rec = wslconfig.recommend(facts.host_ram.bytes, profile) if facts.host_ram and facts.host_ram.is_windows_total else None
    want = f"recommended memory={rec.memory} swap={rec.swap}" if rec else \
        f"recommended: see `{command('wsl-config', dry_run=True, **given)}`"
    fix = f"`{command('wsl-config', **given)}`, then `{command('wsl-restart')}`"
    need = wslconfig.PROFILE_MIN_VM_GIB[profile] * wslconfig.GIB
    if rec is not None:  # a PC too small for the profile's VM: what it can give is the bar, not the profile's wish
        need = min(need, wslconfig.parse_size(rec.memory))
    if not cfg.exists:
        # WSL's defaults: half the host RAM, swap a quarter of that
        found = f"{cfg.path} not found: WSL uses half the host RAM"
        return warn(name, f"{found}; {want}", fix)
    # the values WSL applies, read by the port of WSL's own parser (wsl/wslconfig_parser.py)
    memory, swap, processors = (wslconfig.get(cfg, k) for k in ("memory", "swap", "processors"))
    shown = f"[wsl2] memory={memory or 'default'} swap={swap or 'default'} processors={processors or 'default'}"
    mem_bytes = wslconfig.applied_size(cfg, "memory")
    # Without a memory= WSL applies, WSL gives the VM half the PC's RAM.
    effective = mem_bytes or (facts.host_ram.bytes // 2 if rec is not None else None)
    cpus = wslconfig_parser.parse_int(processors) if processors is not None else None
    if effective and effective < need:
        return warn(name, f"{shown}: under the {gib(need)} the {profile} profile needs; {want}", fix)
    if rec is not None and mem_bytes and mem_bytes > facts.host_ram.bytes:
        return warn(name, f"{shown}: more than this PC's {gib(facts.host_ram.bytes)} of RAM, so WSL gives the VM "
                    f"all of it and Windows none; {want}", fix)
    if cpus == 1:
        return warn(name, f"{shown}: one processor makes loading and image decoding slow; {want}", fix)
    if swap is not None and wslconfig.applied_size(cfg, "swap") == 0:
        return warn(name, f"{shown}: no swap, so a loading peak ends in the OOM killer; {want}", fix)
    if rec is not None and rec.warning:  # all set as this PC can give it: say so, with no loop to run
        return warn(name, f"{shown} ({want}): {rec.warning}", None)
    return ok(name, f"{shown} ({want})")
