"""`vlkit wsl config` and `vlkit wsl restart` (make wsl-config / make wsl-restart).

The command line of `wsl config` is a contract other tools script against:
    vlkit wsl config [--wslconfig PATH] [--memory 12GB] [--swap 8GB] [--processors N] [--dry-run] [--yes]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.planner import options
from scripts.usage import command, setting
from wsl import wslconfig
from wsl.host import detect_platform, host_ram, is_windows_path, meminfo_total_bytes, windows_to_wsl_path, windows_userprofile


def register(subparsers) -> None:
    wsl_parser = subparsers.add_parser("wsl", help="WSL2: .wslconfig and restart")
    sub = wsl_parser.add_subparsers(dest="wsl_command", metavar="WSL_COMMAND")
    wsl_parser.set_defaults(func=lambda args: (wsl_parser.print_help(), 2)[1])

    config = sub.add_parser("config", help="set [wsl2] memory/swap/processors in the Windows .wslconfig",
                            description="Apply the recommended [wsl2] values (or yours) to .wslconfig: "
                                        "backup first, atomic write, same encoding and line endings.")
    config.add_argument("--wslconfig", type=Path, help="the file to edit (default: %%USERPROFILE%%\\.wslconfig found through interop)")
    config.add_argument("--memory", help="WSL VM memory, e.g. 12GB (default: recommended for this PC; with "
                        "--swap or --processors given, the file's own value where it has one)")
    config.add_argument("--swap", help="swap size, e.g. 8GB (default: recommended; with --memory or --processors "
                        "given, the file's own value where it has one)")
    config.add_argument("--processors", type=int, help="logical processors for WSL (default: leave as is)")
    # The profile to size for, and what `vlkit up` would be given to pick it under auto.
    options.add(config, "profile", "model", "context", "gpu_memory")
    config.add_argument("--dry-run", action="store_true", help="show the change as a diff; write nothing")
    config.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    config.set_defaults(func=config_command)

    restart = sub.add_parser("restart", help="list GPU consumers, then `wsl --shutdown` (ends this session)")
    restart.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    restart.set_defaults(func=restart_command)


def _err(message: str) -> int:
    print(f"vlkit wsl config: {message}", file=sys.stderr)
    return 1


def _profile(args: argparse.Namespace) -> tuple[str, str]:
    """The profile to size for, and why: the one asked, or under auto the one `vlkit up` picks with
    the same model, context and card; 8gb, said so, when it picks none."""
    if args.profile != "auto":
        return args.profile, "asked"
    from scripts.planner import plan_for

    other = f"{setting('profile', '16gb')} sizes for vLLM's"
    try:
        plan = plan_for(**options.plan_kwargs(args))
    except (ValueError, LookupError) as exc:  # NoGpu is a LookupError
        return "8gb", f"none picked for this machine ({exc}); {other}"
    if not plan.fits:
        return "8gb", f"{plan.model} fits neither profile on this card ({command('plan')} says what would); {other}"
    return plan.profile, f"the one {command('up')} picks for {plan.model} on this card"


def _windows_ram_bytes() -> int | None:
    """The Windows host's RAM where Windows said it (not an estimate)."""
    ram = host_ram()
    return ram.bytes if ram is not None and ram.is_windows_total else None


def _host_ram_bytes(applied_memory: int | None) -> tuple[int | None, str]:
    ram = host_ram()
    if ram is not None and ram.is_windows_total:
        return ram.bytes, ram.source
    vm = meminfo_total_bytes()
    if detect_platform().is_wsl and not applied_memory and vm:
        # Without a memory= WSL applies (absent, rejected or 0) WSL gives the VM half the host RAM.
        return 2 * vm, "estimated as 2 x the WSL VM's MemTotal (WSL's default limit is half the host RAM)"
    if not detect_platform().is_wsl and vm:
        return vm, "/proc/meminfo of this machine"
    return None, "unknown"


def config_command(args: argparse.Namespace) -> int:
    path = args.wslconfig
    if path is not None and is_windows_path(path):  # else a file named C:\... in this folder
        return _err(f"{path} is a Windows path; in WSL it is {setting('wslconfig', windows_to_wsl_path(str(path)))}")
    if path is None:
        if not detect_platform().is_wsl:
            return _err(f"not running inside WSL; to edit a .wslconfig anyway, name it: {setting('wslconfig', 'PATH')}")
        profile_dir = windows_userprofile()
        if profile_dir is None:
            return _err("cannot find your Windows profile folder (interop off?); name the file: "
                        f"{setting('wslconfig', '/mnt/c/Users/<you>/.wslconfig')}")
        path = profile_dir / ".wslconfig"
    try:
        current = wslconfig.load(path)
    except wslconfig.WslConfigError as exc:
        return _err(f"{path}: {exc}. The file was not changed.")

    values: dict[str, str] = {}
    try:
        for key in wslconfig.SIZE_KEYS:
            given = getattr(args, key)
            if given is not None:
                size = wslconfig.parse_size_to_write(given.strip())  # validate before touching anything
                if key == "memory" and size < wslconfig.MIN_MEMORY:
                    bare = " (to WSL a number without a unit is bytes: did you mean 12GB?)" if given.strip().isdigit() else ""
                    return _err(f"{setting('memory', given)} is {size} bytes, under WSL's 256MB minimum{bare}")
                values[key] = given.strip()
    except ValueError as exc:
        return _err(f"{setting(key)}: {exc}")
    if args.processors is not None:
        if args.processors < 1:
            return _err(f"{setting('processors')} must be at least 1")
        values["processors"] = str(args.processors)

    windows_ram = _windows_ram_bytes() if values else None
    if "memory" in values and windows_ram is not None and wslconfig.parse_size(values["memory"]) > windows_ram:
        return _err(f"{setting('memory', values['memory'])} is more than this PC's {windows_ram / wslconfig.GIB:.0f} GB "
                    "of RAM: WSL would give the VM all of it and leave Windows none; give less, or leave it out for "
                    "the recommendation")
    if values:  # the user edits these keys: what else the file sets WSL to, it keeps (if it is a sane value)
        for key in wslconfig.SIZE_KEYS:
            if key not in values and wslconfig.applied_size(current, key) is not None:
                kept = wslconfig.get(current, key).strip()
                try:
                    size = wslconfig.parse_size_to_write(kept)
                except ValueError:
                    continue  # -1 and the like: the recommendation instead
                if key == "memory" and windows_ram is not None and size > windows_ram:
                    continue
                values[key] = kept
    if "memory" not in values or "swap" not in values:
        ram, source = _host_ram_bytes(wslconfig.applied_size(current, "memory"))
        if ram is None:
            return _err(f"cannot tell this PC's RAM; give {setting('memory', '12GB')} and {setting('swap', '8GB')}")
        profile, why = _profile(args)
        rec = wslconfig.recommend(ram, profile)
        print(f"Recommended for the {profile} profile: {rec.rule}")
        print(f"  (profile: {why}; host RAM from {source})")
        if rec.warning:
            print(f"  warning: {rec.warning}")
        values.setdefault("memory", rec.memory)
        values.setdefault("swap", rec.swap)

    try:
        preview = wslconfig.apply(path, values, dry_run=True)
    except (wslconfig.WslConfigError, OSError) as exc:
        return _err(f"{path}: {exc}. The file was not changed.")
    if preview.notes:
        print("What WSL will still skip or reject (line numbers of the file as written):")
    for note in preview.notes:
        print(f"  note: {note}")
    if not preview.changed:
        print(f"{path}: already has {', '.join(f'{k}={v}' for k, v in values.items())}; nothing to change.")
        return 0
    print(preview.diff, end="")
    if args.dry_run:
        print("Dry run: nothing was written.")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            return _err("not changing .wslconfig without confirmation and there is no terminal to ask on; "
                        f"add {setting('yes')} (or {setting('dry_run')} to only look)")
        try:
            answer = input(f"Write these changes to {path}? [y/N] ")
        except EOFError:  # Ctrl-D: no answer is no
            answer = ""
            print()
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing changed.")
            return 0
    try:
        result = wslconfig.apply(path, values)
    except (wslconfig.WslConfigError, OSError) as exc:
        return _err(f"{path}: {exc}. The file was not changed.")
    if result.backup:
        print(f"Backup: {result.backup}")
    print(f"Wrote {path}. It takes effect after WSL restarts: `{command('wsl-restart')}` (or `wsl --shutdown` in PowerShell).")
    return 0


def restart_command(args: argparse.Namespace) -> int:
    from wsl.restart import restart
    return restart(yes=args.yes)
