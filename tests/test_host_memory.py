"""service/host_memory.py: /proc/meminfo and the memory cgroup's limit, read from recorded files.

tests/data/host_memory/linux-cgroup-v1 is this CI machine's, copied as they were (a hybrid system:
the memory controller on v1, this process in /process_api/<id>, no limit set). The limited trees
are that recording with the limit a container gets written in; the v2 files follow the kernel's
Documentation/admin-guide/cgroup-v2.rst (no machine here has a v2 memory controller to record).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from service.host_memory import available_host_memory, cgroup_headroom, meminfo
from tests.docker_helpers import ROOT

RECORDED = ROOT / "tests/data/host_memory/linux-cgroup-v1"
RECORDED_CGROUP = RECORDED / "sys/fs/cgroup/memory/process_api/c07e215122de4f5be0a366876506f697"
KIB, GIB = 1024, 1024**3
MEM_AVAILABLE = 23676228 * KIB   # the recording's MemAvailable line
USAGE, INACTIVE_FILE = 159019008, 100990976  # its memory.usage_in_bytes, memory.stat total_inactive_file


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A filesystem root: the recorded /proc/meminfo plus ``files`` (path -> text)."""
    (tmp_path / "proc").mkdir(parents=True)
    shutil.copy(RECORDED / "proc/meminfo", tmp_path / "proc/meminfo")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def _limited_v1_stat(limit: int) -> str:
    text = (RECORDED_CGROUP / "memory.stat").read_text()
    return text.replace("hierarchical_memory_limit 9223372036854771712", f"hierarchical_memory_limit {limit}")


def test_meminfo_reads_the_recorded_file_in_bytes():
    fields = meminfo((RECORDED / "proc/meminfo").read_text())
    assert fields["MemTotal"] == 24683584 * KIB and fields["MemAvailable"] == MEM_AVAILABLE
    assert fields["Hugepagesize"] == 2048 * KIB and fields["HugePages_Total"] == 0  # a count, not kB
    assert meminfo("") == {} and meminfo("MemTotal: lots\n") == {}


def test_without_a_limit_it_is_memavailable():
    assert cgroup_headroom(RECORDED) is None
    assert available_host_memory(RECORDED) == MEM_AVAILABLE


def test_a_v1_limit_caps_it_at_what_the_limit_leaves(tmp_path):
    """`docker run --memory 2g` on this machine: 2 GiB less what the cgroup holds, dropped page cache aside."""
    cgroup = "sys/fs/cgroup/memory/process_api/c07e215122de4f5be0a366876506f697"
    root = _tree(tmp_path, {
        "proc/self/cgroup": (RECORDED / "proc/self/cgroup").read_text(),
        f"{cgroup}/memory.stat": _limited_v1_stat(2 * GIB),
        f"{cgroup}/memory.limit_in_bytes": f"{2 * GIB}\n",
        f"{cgroup}/memory.usage_in_bytes": f"{USAGE}\n",
    })
    assert available_host_memory(root) == 2 * GIB - (USAGE - INACTIVE_FILE) < MEM_AVAILABLE


def test_a_v1_container_without_its_own_cgroup_namespace_reads_the_mount_itself(tmp_path):
    """/proc/self/cgroup names the host's /docker/<id>, which the container sees as its mount."""
    recorded_self = (RECORDED / "proc/self/cgroup").read_text()
    root = _tree(tmp_path, {
        "proc/self/cgroup": recorded_self.replace("/process_api/c07e215122de4f5be0a366876506f697", "/docker/4f1c2a"),
        "sys/fs/cgroup/memory/memory.stat": _limited_v1_stat(GIB),
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{USAGE}\n",
    })
    assert cgroup_headroom(root) == GIB - (USAGE - INACTIVE_FILE)


V2_STAT = "anon 52428800\nfile 209715200\nkernel 8388608\ninactive_anon 0\nactive_anon 52428800\ninactive_file 157286400\nactive_file 52428800\nunevictable 0\n"


def test_v2_memory_max_caps_it(tmp_path):
    """A container with its own cgroup namespace (Docker's default on v2): "0::/", the limit at the mount."""
    root = _tree(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": f"{4 * GIB}\n",
                            "sys/fs/cgroup/memory.current": "262144000\n", "sys/fs/cgroup/memory.stat": V2_STAT})
    assert available_host_memory(root) == 4 * GIB - (262144000 - 157286400)


def test_v2_takes_the_tightest_limit_above_the_process_and_max_is_none(tmp_path):
    leaf = "sys/fs/cgroup/system.slice/docker-4f1c2a.scope"
    files = {"proc/self/cgroup": "0::/system.slice/docker-4f1c2a.scope\n",
             f"{leaf}/memory.max": "max\n", f"{leaf}/memory.current": "262144000\n", f"{leaf}/memory.stat": V2_STAT}
    assert cgroup_headroom(_tree(tmp_path / "unlimited", files)) is None
    slice_limit = {"sys/fs/cgroup/system.slice/memory.max": f"{GIB}\n",
                   "sys/fs/cgroup/system.slice/memory.current": f"{GIB // 2}\n"}
    assert cgroup_headroom(_tree(tmp_path / "sliced", {**files, **slice_limit})) == GIB // 2


def test_off_linux_there_is_no_figure(tmp_path):
    assert available_host_memory(tmp_path) is None


def test_this_machine_has_a_figure_and_the_host_tools_get_it_without_torch():
    res = subprocess.run([sys.executable, "-c", "import sys, wsl.host, service.host_memory as m; "
                          "print(m.available_host_memory(), 'torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True)
    available, torch_loaded = res.stdout.split()
    total = meminfo(Path("/proc/meminfo").read_text())["MemTotal"]
    assert 0 < int(available) <= total and torch_loaded == "False", res.stderr
