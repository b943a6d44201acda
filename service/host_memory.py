"""The machine's memory as Linux reports it: /proc/meminfo, capped by the memory cgroup this process
is in (a container's `--memory`, a Kubernetes limit: cgroup v2 memory.max, v1 memory.limit_in_bytes),
which /proc/meminfo does not show. One parser for the service's CPU batch check and the host tools
(wsl/host.py); beside the service because the 8gb image copies service/ only, and light (no torch)
because the host tools import it.

Every function takes the filesystem ``root`` it reads under, so tests read recorded files.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path("/")
CGROUP_MOUNT = "sys/fs/cgroup"
# v1 writes "no limit" as the largest multiple of the page size below 2**63 (9223372036854771712
# with 4 KiB pages): anything this large is none.
V1_NO_LIMIT = 2**62


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo's fields, the sizes in bytes ("MemTotal:  24683584 kB" -> {"MemTotal": 25275990016});
    the counts (HugePages_Total: 0) as they are."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        words = value.split()
        if words and words[0].isdigit():
            fields[name.strip()] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return fields


def available_host_memory(root: Path = ROOT) -> int | None:
    """Bytes this process can still allocate without swapping or meeting the OOM killer: Linux's
    MemAvailable, or less where the memory cgroup's limit leaves less; None without /proc/meminfo."""
    available = meminfo(_read(root / "proc/meminfo") or "").get("MemAvailable")
    if available is None:
        return None
    headroom = cgroup_headroom(root)
    return available if headroom is None else max(0, min(available, headroom))


def cgroup_headroom(root: Path = ROOT) -> int | None:
    """What this process's memory cgroup, and each one above it, still lets it allocate: the limit
    less the usage, page cache it can drop (inactive_file) not counted, as the kubelet's working set;
    the least of them. None where no memory cgroup sets a limit."""
    found = _memory_cgroup(_read(root / "proc/self/cgroup") or "")
    if found is None:
        return None
    version, path = found
    mount = root / CGROUP_MOUNT / ("memory" if version == 1 else "")
    here = _deepest_existing(mount, path)
    return _v1_headroom(here) if version == 1 else _v2_headroom(here, mount)


def _memory_cgroup(self_cgroup: str) -> tuple[int, str] | None:
    """(1, path) where /proc/self/cgroup has a v1 hierarchy with the memory controller (a hybrid
    system's other v1 lines and its v2 "0::" line do not count), else (2, path) from "0::path"."""
    unified = None
    for line in self_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if "memory" in controllers.split(","):
            return 1, path
        if hierarchy == "0" and not controllers:
            unified = (2, path)
    return unified


def _deepest_existing(mount: Path, path: str) -> Path:
    """The process's cgroup folder under the mount. In a container without a cgroup namespace of its
    own, /proc/self/cgroup names the host's path (/docker/<id>) while the mount is that cgroup
    itself, so the deepest part of the path that exists is the one."""
    parts = [part for part in path.split("/") if part]
    for depth in range(len(parts), 0, -1):
        if (candidate := mount.joinpath(*parts[:depth])).is_dir():
            return candidate
    return mount


def _v1_headroom(folder: Path) -> int | None:
    # memory.stat's hierarchical_memory_limit is the least limit of the cgroup and those above it.
    stat = _stat(folder / "memory.stat")
    limit = stat.get("hierarchical_memory_limit") or _number(folder / "memory.limit_in_bytes")
    usage = _number(folder / "memory.usage_in_bytes")
    if limit is None or limit >= V1_NO_LIMIT or usage is None:
        return None
    return limit - (usage - stat.get("total_inactive_file", stat.get("inactive_file", 0)))


def _v2_headroom(folder: Path, mount: Path) -> int | None:
    # v2 has no hierarchical figure: each level up to the mount has its own memory.max ("max": none).
    least = None
    for level in (folder, *folder.parents):
        limit, usage = _number(level / "memory.max"), _number(level / "memory.current")
        if limit is not None and usage is not None:
            room = limit - (usage - _stat(level / "memory.stat").get("inactive_file", 0))
            least = room if least is None else min(least, room)
        if level == mount:
            break
    return least


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _number(path: Path) -> int | None:
    text = (_read(path) or "").strip()
    return int(text) if text.isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    """memory.stat's "name value" lines."""
    pairs = (line.split() for line in (_read(path) or "").splitlines())
    return {words[0]: int(words[1]) for words in pairs if len(words) == 2 and words[1].isdigit()}
