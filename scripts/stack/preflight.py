"""What `vlkit up`, `build` and `bench` check before they start anything slow: Docker answers, a
GPU is there, a local model folder is one the container can read. Each problem is one line that
names the fix in the user's terms (make variables under make, flags otherwise: scripts/usage.py)."""
from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from scripts import images
from scripts.usage import command


def error(message: str) -> None:
    """One line on stderr, prefixed like every vlkit message."""
    print(f"vlkit: {message}", file=sys.stderr)


def default_port() -> int:
    """The API's host port when no --port is given: $VLKIT_PORT (compose.yaml publishes the same),
    else 8000. A bad value ends the command as a bad flag does (exit 2), naming the variable."""
    from scripts.planner.options import port
    from scripts.stack.compose import DEFAULT_PORT

    text = os.environ.get("VLKIT_PORT") or str(DEFAULT_PORT)
    try:
        return port(text)
    except argparse.ArgumentTypeError:
        error(f"VLKIT_PORT={text!r} is not a port (1..65535): set it to one, or unset it.")
        raise SystemExit(2) from None


def docker_ok(extra: str = "") -> bool:
    """require_docker(), reported as one line (with `extra` appended) instead of a traceback."""
    from scripts.stack import docker as dk

    try:
        dk.require_docker()
    except dk.DockerError as e:
        error(f"{e}{extra}")
        return False
    return True


def docker_gpu_problem(info_json: str) -> str | None:
    """Why this Docker daemon (`docker info --format '{{json .}}'`) cannot give a container the GPU,
    or None. Checked before downloading and building, which take minutes, not after."""
    import shutil

    from scripts.doctor.docker import DESKTOP_GPU_FIX, TOOLKIT_FIX, gpu_runtime, is_docker_desktop, parse_info

    info = parse_info(info_json)
    if info is None or gpu_runtime(info, hook_on_path=shutil.which("nvidia-container-runtime-hook") is not None):
        return None
    fix = DESKTOP_GPU_FIX if is_docker_desktop(info) else TOOLKIT_FIX
    return (f"Docker has no NVIDIA runtime, so a container cannot get the GPU (compose would fail with "
            f"\"could not select device driver\"). Fix: {fix}; `{command('doctor')}` checks it.")


def no_gpu_line(reason: str, doing: str, on_the_cpu: str) -> str:
    """`doing` cannot work without a GPU: why, and the two ways on (the doctor, the CPU test mode:
    `on_the_cpu`, the user's own command with --cpu, so it serves the model they named)."""
    return (f"no NVIDIA GPU answers here ({reason}), so {doing}. `{command('doctor')}` says what to "
            f"install; to try vlkit without a GPU: `{on_the_cpu}` (the model runs on the CPU: slow, for "
            "trying it out).")


def gpu_missing() -> str | None:
    """Why no GPU can be used here (the driver probe's words), or None when one answers."""
    from scripts.gpu import probe

    found = probe()
    return None if found.gpus else (found.error or "no NVIDIA GPU found")


def looks_like_a_path(model: str) -> bool:
    """A folder the user meant (./x, ~/x, /x), not a hub id (org/name)."""
    return model.startswith((".", "~", os.sep)) or os.path.isdir(os.path.expanduser(model))


def _can_read(st: os.stat_result, uid: int, gid: int, need: int) -> bool:
    """Unix permission bits as the kernel checks them for a process of uid:gid (no other groups)."""
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & need == need


def model_folder_problem(folder: Path, uid: int = images.SERVICE_UID, gid: int = images.SERVICE_UID) -> str | None:
    """Why the 8gb container (user uid:gid) cannot load the model folder bind-mounted at /models,
    or None. Files saved by save_pretrained are often 0600 (readable only by their owner), and a
    link out of the folder (a Hugging Face cache snapshot) does not resolve inside the container."""
    if not (folder / "config.json").is_file():
        return (f"{folder} is not a model folder (no config.json in it). Give the folder "
                "save_pretrained wrote, or a hub id such as Qwen/Qwen3-VL-2B-Instruct.")
    root = folder.resolve()
    unreadable: list[str] = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        if path.is_symlink():
            target = path.resolve()
            if root != target and root not in target.parents:
                return (f"{path} links outside the folder (to {target}), and the container sees only "
                        f"the folder. For a model in the Hugging Face cache give its hub id "
                        f"({command('up', model='Qwen/...')}); else copy it with its links resolved: "
                        f"`cp -rL {folder} {folder}-copy`.")
        try:
            st = path.stat()
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        need = 0o5 if stat.S_ISDIR(st.st_mode) else 0o4  # folders: list + enter; files: read
        if not _can_read(st, uid, gid, need):
            unreadable.append(f"{path.relative_to(folder) if path != folder else '.'} "
                              f"({stat.filemode(st.st_mode)})")
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        return (f"the 8gb container runs as uid {uid} and cannot read {shown} in {folder} "
                f"(save_pretrained writes weights readable by their owner only). "
                f"Fix: `chmod -R a+rX {folder}`, then run it again.")
    return None
