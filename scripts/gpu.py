"""GPU discovery on the host, without torch: NVML first, `nvidia-smi` as the fallback.

NVML (nvidia-ml-py) is NVIDIA's stable API; nvidia-smi's text is not guaranteed stable, so it is
only the fallback (e.g. a distro where libnvidia-ml.so.1 is not on the loader path). Inside WSL2
both come from the Windows driver through /usr/lib/wsl/lib. Under WSL (WDDM driver model) the
driver does not report per-process memory: those processes get ``used_bytes=None``.

Every parser here is a pure function of text so that tests feed it real recorded outputs.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

MIB = 1024 * 1024
WSL_LIB_DIR = "/usr/lib/wsl/lib"
NVIDIA_SMI_TIMEOUT_S = 10.0

# Fields asked from `nvidia-smi --query-gpu`; compute_cap needs driver >= 510, older ones answer
# 'Field "compute_cap" is not a valid field to query.' and we ask again without it.
GPU_QUERY_FIELDS = ("index", "name", "uuid", "memory.total", "memory.used", "memory.free",
                    "driver_version", "compute_cap")
APPS_QUERY_FIELDS = ("gpu_uuid", "pid", "process_name", "used_memory")

# What nvidia-smi prints instead of a value it cannot read.
_MISSING = {"", "n/a", "[n/a]", "[not supported]", "not supported", "not available",
            "[not available]", "[unknown error]", "[insufficient permissions]", "none"}


@dataclass
class GpuProcess:
    pid: int
    name: str
    used_bytes: int | None  # None: the driver does not say (always the case under WSL/WDDM)


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str | None
    total_bytes: int
    free_bytes: int
    used_bytes: int  # total - free: everything we cannot have, driver-reserved memory included
    driver_version: str
    cuda_driver_version: str | None  # the newest CUDA this driver supports, e.g. "12.8"
    compute_capability: tuple[int, int] | None
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class GpuProbe:
    """What discovery found, and why not when it found nothing (for the doctor's fix)."""
    gpus: list[GpuInfo]
    source: str | None  # "nvml" | "nvidia-smi" | None
    nvidia_smi: str | None  # path of the nvidia-smi binary, when there is one
    error: str | None = None


# --------------------------------------------------------------------------- pure parsers

def _missing(value: str) -> bool:
    return value.strip().lower() in _MISSING


def _mib(value: str) -> int | None:
    """'81559', '81559 MiB' -> bytes; '[N/A]' -> None."""
    value = value.strip()
    if _missing(value):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(MiB)?", value)
    return int(float(m.group(1)) * MIB) if m else None


def _int_or_none(value: str) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


def parse_compute_cap(value: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", value or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_version_from_int(value: int) -> str:
    """NVML's 12080 -> '12.8', 13000 -> '13.0'."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _csv_rows(text: str) -> list[list[str]]:
    rows = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if row and any(cell.strip() for cell in row):
            rows.append([cell.strip() for cell in row])
    return rows


def parse_gpu_query_csv(text: str, fields: tuple[str, ...] = GPU_QUERY_FIELDS) -> list[GpuInfo]:
    """Parse `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` (a header line and
    'MiB' units are tolerated). Processes and the CUDA version are filled in by the caller."""
    gpus = []
    for row in _csv_rows(text):
        if row[0].lower() == fields[0]:  # a header line
            continue
        if len(row) < len(fields):
            raise ValueError(f"nvidia-smi CSV row has {len(row)} fields, expected {len(fields)}: {row!r}")
        rec = dict(zip(fields, row))
        total = _mib(rec["memory.total"]) or 0
        free = _mib(rec["memory.free"])
        used = _mib(rec["memory.used"])
        if free is None:
            free = max(total - (used or 0), 0)
        gpus.append(GpuInfo(
            index=int(rec["index"]),
            name=rec["name"],
            uuid=None if _missing(rec.get("uuid", "")) else rec.get("uuid"),
            total_bytes=total,
            free_bytes=free,
            used_bytes=max(total - free, 0),
            driver_version=rec.get("driver_version", ""),
            cuda_driver_version=None,
            compute_capability=parse_compute_cap(rec.get("compute_cap", "")),
        ))
    return gpus


def parse_compute_apps_csv(text: str, fields: tuple[str, ...] = APPS_QUERY_FIELDS) -> list[tuple[str | None, GpuProcess]]:
    """Parse `nvidia-smi --query-compute-apps=<fields> --format=csv,noheader,nounits` into
    (gpu_uuid, process) pairs. '[N/A]' / '[Not Supported]' memory (WSL) becomes None."""
    out = []
    for row in _csv_rows(text):
        if row[0].lower() == fields[0] or row[0].lower().startswith("no running"):
            continue
        rec = dict(zip(fields, row))
        pid = _int_or_none(rec.get("pid", ""))
        if pid is None:
            continue
        uuid = rec.get("gpu_uuid")
        out.append((None if uuid is None or _missing(uuid) else uuid,
                    GpuProcess(pid=pid, name=rec.get("process_name", "?"), used_bytes=_mib(rec.get("used_memory", "")))))
    return out


# Version lines of the `nvidia-smi` table header and of `nvidia-smi -q`; drivers >= 610 say
# "KMD Version" and "CUDA UMD Version"; drivers before ~410 print no CUDA version at all.
_DRIVER_RE = re.compile(r"(?:Driver|KMD) Version\s*:\s*(\S+)")
_CUDA_RE = re.compile(r"CUDA (?:UMD )?Version\s*:\s*(\d+\.\d+)")
# A process row of the `nvidia-smi` table, old layout (GPU PID Type Name Mem) and new one with the
# MIG instance columns (GPU GI CI PID Type Name Mem); memory is "2844MiB" or "N/A" (WSL).
_PROC_ROW_RE = re.compile(
    r"^\|\s+(?P<gpu>\d+)\s+(?:(?:N/A|\d+)\s+(?:N/A|\d+)\s+)?(?P<pid>\d+)\s+(?P<type>C\+G|C|G|M\+C|M)\s+"
    r"(?P<name>.+?)\s+(?P<mem>\d+MiB|N/A)\s*\|$")


def parse_smi_header(text: str) -> tuple[str | None, str | None]:
    """(driver version, CUDA version) from the `nvidia-smi` table header or `nvidia-smi -q` (pure)."""
    driver = _DRIVER_RE.search(text)
    cuda = _CUDA_RE.search(text)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def parse_smi_processes(text: str) -> list[tuple[int, GpuProcess]]:
    """(gpu index, process) pairs from the Processes table of plain `nvidia-smi`: the only
    nvidia-smi view that also lists graphics clients (type G: Xwayland, browsers)."""
    out = []
    in_procs = False
    for line in text.splitlines():
        if "Processes:" in line:
            in_procs = True
            continue
        if not in_procs:
            continue
        m = _PROC_ROW_RE.match(line.rstrip())
        if m:
            used = None if m.group("mem") == "N/A" else int(m.group("mem")[:-3]) * MIB
            out.append((int(m.group("gpu")), GpuProcess(int(m.group("pid")), m.group("name").strip(), used)))
    return out


def parse_nvsmi_q(text: str) -> dict:
    """Parse `nvidia-smi -q` into nested dicts by indentation. Top level holds 'Driver Version',
    'CUDA Version', ... and 'GPUs': a list of per-GPU trees keyed by section name. Repeated keys
    (the per-process blocks) become lists."""
    root: dict = {"GPUs": []}
    stack: list[tuple[int, dict]] = [(-1, root)]

    def put(d: dict, key: str, value):
        if key not in d:
            d[key] = value
        elif isinstance(d[key], list):
            d[key].append(value)
        else:
            d[key] = [d[key], value]

    for raw in text.splitlines():
        if not raw.strip() or raw.strip().startswith("====="):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if indent == 0 and re.match(r"GPU [0-9A-Fa-f]+:[0-9A-Fa-f]+:", line):
            gpu: dict = {"Bus Id": line[4:]}
            root["GPUs"].append(gpu)
            stack.append((indent, gpu))
            continue
        if " : " in line or line.endswith(" :"):
            key, _, value = line.partition(":")
            put(parent, key.strip(), value.strip())
        else:
            section: dict = {}
            put(parent, line, section)
            stack.append((indent, section))
    return root


# --------------------------------------------------------------------------- discovery

def find_nvidia_smi() -> str | None:
    """nvidia-smi on PATH, else WSL's copy (not on PATH in every distro)."""
    found = shutil.which("nvidia-smi")
    if found:
        return found
    wsl = os.path.join(WSL_LIB_DIR, "nvidia-smi")
    return wsl if os.access(wsl, os.X_OK) else None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _smi_error(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stdout + "\n" + proc.stderr).strip()
    return text.splitlines()[0] if text else f"exit status {proc.returncode}"


def _probe_nvml() -> GpuProbe:
    import pynvml  # nvidia-ml-py; loads libnvidia-ml.so.1 lazily, at nvmlInit

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuProbe([], None, None, f"NVML: {exc}")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        try:
            cuda = cuda_version_from_int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
        except pynvml.NVMLError:
            cuda = None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                uuid = pynvml.nvmlDeviceGetUUID(h)
            except pynvml.NVMLError:
                uuid = None
            try:
                cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except pynvml.NVMLError:
                cc = None
            gpus.append(GpuInfo(index=i, name=pynvml.nvmlDeviceGetName(h), uuid=uuid,
                                total_bytes=int(mem.total), free_bytes=int(mem.free),
                                used_bytes=int(mem.total - mem.free), driver_version=driver,
                                cuda_driver_version=cuda, compute_capability=cc,
                                processes=_nvml_processes(pynvml, h)))
        return GpuProbe(gpus, "nvml", find_nvidia_smi())
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _nvml_processes(pynvml, handle) -> list[GpuProcess]:
    seen: dict[int, GpuProcess] = {}
    for getter in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            procs = getter(handle)
        except pynvml.NVMLError:  # WSL: often NOT_SUPPORTED
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen[p.pid] = GpuProcess(int(p.pid), _process_name(pynvml, p.pid), p.usedGpuMemory)
    return list(seen.values())


def _process_name(pynvml, pid: int) -> str:
    try:
        return pynvml.nvmlSystemGetProcessName(pid)
    except pynvml.NVMLError:
        pass
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _optional(future) -> subprocess.CompletedProcess:
    """The result of a query that only adds detail (CUDA version, processes): when it times out or
    cannot run, the GPUs already read still count."""
    try:
        return future.result()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess([], 1, "", str(exc))


def _probe_nvidia_smi(smi: str, timeout: float) -> GpuProbe:
    def query_gpus(fields):
        return _run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"], timeout)

    with ThreadPoolExecutor(3) as pool:  # three driver round trips; WSL makes each one slow
        f_gpus = pool.submit(query_gpus, GPU_QUERY_FIELDS)
        f_table = pool.submit(_run, [smi], timeout)
        f_apps = pool.submit(_run, [smi, f"--query-compute-apps={','.join(APPS_QUERY_FIELDS)}",
                                    "--format=csv,noheader,nounits"], timeout)
        fields = GPU_QUERY_FIELDS
        proc = f_gpus.result()
        if proc.returncode != 0 and "compute_cap" in (proc.stdout + proc.stderr):
            fields = tuple(f for f in GPU_QUERY_FIELDS if f != "compute_cap")
            proc = query_gpus(fields)
        if proc.returncode != 0:
            return GpuProbe([], None, smi, f"nvidia-smi: {_smi_error(proc)}")
        gpus = parse_gpu_query_csv(proc.stdout, fields)
        table = _optional(f_table)
        apps = _optional(f_apps)
    _, cuda = parse_smi_header(table.stdout) if table.returncode == 0 else (None, None)
    by_uuid = {g.uuid: g for g in gpus}
    by_index = {g.index: g for g in gpus}
    for g in gpus:
        g.cuda_driver_version = cuda
    if apps.returncode == 0:
        for uuid, p in parse_compute_apps_csv(apps.stdout):
            g = by_uuid.get(uuid) or (gpus[0] if len(gpus) == 1 else None)
            if g is not None and all(q.pid != p.pid for q in g.processes):
                g.processes.append(p)
    if table.returncode == 0:
        for idx, p in parse_smi_processes(table.stdout):
            g = by_index.get(idx)
            if g is not None and all(q.pid != p.pid for q in g.processes):
                g.processes.append(p)
    return GpuProbe(gpus, "nvidia-smi", smi)


def probe(timeout: float = NVIDIA_SMI_TIMEOUT_S) -> GpuProbe:
    """NVML, then nvidia-smi; never raises for a missing driver or GPU."""
    nvml_error = None
    try:
        result = _probe_nvml()
        if result.gpus:
            return result
        nvml_error = result.error or "NVML: no GPU"
    except Exception as exc:  # a broken libnvidia-ml must not stop the fallback
        nvml_error = f"NVML: {exc}"
    smi = find_nvidia_smi()
    if smi is None:
        return GpuProbe([], None, None, f"{nvml_error}; nvidia-smi not found (PATH, {WSL_LIB_DIR})")
    try:
        result = _probe_nvidia_smi(smi, timeout)
    except subprocess.TimeoutExpired:
        return GpuProbe([], None, smi, f"{nvml_error}; nvidia-smi did not answer within {timeout:.0f} s")
    except (OSError, ValueError) as exc:
        return GpuProbe([], None, smi, f"{nvml_error}; nvidia-smi: {exc}")
    if not result.gpus and result.error is None:
        result.error = f"{nvml_error}; nvidia-smi lists no GPU"
    return result


def detect_gpus() -> list[GpuInfo]:
    """All NVIDIA GPUs with memory and processes; [] when there is no driver or no GPU."""
    return probe().gpus
