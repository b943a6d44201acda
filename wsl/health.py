"""The health gate `make up` passes first: the driver answers, reports no memory errors, and enough
VRAM is free for the plan. Each refusal comes with its reason and the fix.

Sources: `nvidia-smi -q -d MEMORY,ECC,PAGE_RETIREMENT,ROW_REMAPPER` (one driver round trip) and,
where the kernel lets us read it, `dmesg` for NVRM Xid lines. Under WSL2 the driver lives in
Windows: Xid lines never reach the WSL kernel log and ECC counters read N/A on GeForce cards.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from scripts.gpu import MIB, find_nvidia_smi, parse_nvsmi_q

SMI_TIMEOUT_S = 10.0
SMI_QUERY = ["-q", "-d", "MEMORY,ECC,PAGE_RETIREMENT,ROW_REMAPPER"]

# Xid codes that mean the GPU or its memory is unhealthy (NVIDIA's Xid catalog); application faults
# such as 13 (graphics engine exception) or 31 (MMU fault) are a program's bug, not the card's.
CRITICAL_XIDS = {
    48: "double-bit ECC error",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
_XID_RE = re.compile(r"NVRM: Xid \((?P<dev>[^)]*)\): (?P<code>\d+)")
_FELL_OFF_RE = re.compile(r"NVRM: (?:The NVIDIA GPU|GPU at) ([0-9A-Fa-f:.]+)")


@dataclass
class GateResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    free_bytes: int | None = None
    total_bytes: int | None = None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reasons": self.reasons, "fixes": self.fixes,
                "free_bytes": self.free_bytes, "total_bytes": self.total_bytes}


@dataclass
class MemoryErrors:
    """Per GPU: what the ECC / retirement / remapping sections of `nvidia-smi -q` report."""
    volatile_uncorrectable: int = 0  # since the driver loaded: a live fault
    aggregate_uncorrectable: int = 0  # lifetime; informative, handled by remapping
    retirement_pending: bool = False  # pages waiting for a reset to be retired
    remap_pending: bool = False
    remap_failed: bool = False


def _count(value) -> int:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else 0


def _uncorrectable(tree) -> int:
    """Sum of uncorrectable counters under an ECC scope, for old (Single/Double Bit) and new
    (SRAM/DRAM Uncorrectable) layouts alike; N/A counts as 0."""
    if not isinstance(tree, dict):
        return 0
    total = 0
    for key, value in tree.items():
        if isinstance(value, dict):
            if key.lower().startswith("double bit"):
                total += _count(value.get("Total")) if "Total" in value else sum(_count(v) for v in value.values())
            else:
                total += _uncorrectable(value)
        elif "uncorrectable" in key.lower():
            total += _count(value)
    return total


def parse_memory_errors(q_text: str) -> list[MemoryErrors]:
    """One MemoryErrors per GPU from `nvidia-smi -q` text (pure)."""
    out = []
    for gpu in parse_nvsmi_q(q_text)["GPUs"]:
        ecc = gpu.get("ECC Errors") if isinstance(gpu.get("ECC Errors"), dict) else {}
        retired = gpu.get("Retired Pages") if isinstance(gpu.get("Retired Pages"), dict) else {}
        remap = gpu.get("Remapped Rows") if isinstance(gpu.get("Remapped Rows"), dict) else {}
        pending_retire = any(str(retired.get(k, "")).strip().lower() == "yes"
                             for k in ("Pending Page Blacklist", "Pending Page Retirement", "Pending"))
        out.append(MemoryErrors(
            volatile_uncorrectable=_uncorrectable(ecc.get("Volatile")),
            aggregate_uncorrectable=_uncorrectable(ecc.get("Aggregate")),
            retirement_pending=pending_retire,
            remap_pending=str(remap.get("Pending", "")).strip().lower() == "yes",
            remap_failed=str(remap.get("Remapping Failure Occurred", "")).strip().lower() == "yes",
        ))
    return out


def parse_fb_memory(q_text: str) -> list[tuple[int, int]]:
    """(total_bytes, free_bytes) per GPU from the 'FB Memory Usage' section (pure)."""
    out = []
    for gpu in parse_nvsmi_q(q_text)["GPUs"]:
        fb = gpu.get("FB Memory Usage")
        if not isinstance(fb, dict):
            continue
        total = re.match(r"(\d+)", str(fb.get("Total", "")))
        free = re.match(r"(\d+)", str(fb.get("Free", "")))
        if total and free:
            out.append((int(total.group(1)) * MIB, int(free.group(1)) * MIB))
    return out


def parse_xids(dmesg_text: str) -> list[tuple[str, int]]:
    """(device, Xid code) for every NVRM Xid line in dmesg output (pure). Newer drivers may report a
    GPU that fell off the bus over several lines without an Xid: that counts as Xid 79."""
    found = [(m.group("dev"), int(m.group("code"))) for m in _XID_RE.finditer(dmesg_text)]
    if "fallen off the bus" in dmesg_text and not any(code == 79 for _, code in found):
        m = _FELL_OFF_RE.search(dmesg_text)
        found.append((m.group(1) if m else "GPU", 79))
    return found


def _read_dmesg(timeout: float = 2.0) -> str | None:
    """dmesg text, or None when the kernel does not let us read it (dmesg_restrict) or it is absent."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def evaluate(q_text: str, required_free_bytes: int | None, dmesg_text: str | None = None,
             gpu_index: int = 0) -> GateResult:
    """The gate's verdict from recorded texts (pure): what `gate` runs after collecting them."""
    result = GateResult(ok=True)
    fb = parse_fb_memory(q_text)
    if not fb:
        return GateResult(False, ["nvidia-smi answered but listed no GPU memory"],
                          ["check the GPU in Windows Device Manager / `nvidia-smi` on the host"])
    total, free = fb[min(gpu_index, len(fb) - 1)]
    result.total_bytes, result.free_bytes = total, free
    for i, err in enumerate(parse_memory_errors(q_text)):
        if err.volatile_uncorrectable:
            result.reasons.append(f"GPU {i}: {err.volatile_uncorrectable} uncorrectable ECC error(s) since the driver loaded")
            result.fixes.append("reset the GPU (`sudo nvidia-smi -r`) or reboot; if it comes back, the card needs service")
        if err.retirement_pending or err.remap_pending:
            result.reasons.append(f"GPU {i}: memory pages/rows are waiting to be retired")
            result.fixes.append("reboot (or `sudo nvidia-smi -r`) so the driver retires them")
        if err.remap_failed:
            result.reasons.append(f"GPU {i}: row remapping failed")
            result.fixes.append("the card's memory is failing: have it serviced or use another GPU")
    if dmesg_text:
        seen = set()
        for dev, code in parse_xids(dmesg_text):
            if code in CRITICAL_XIDS and (dev, code) not in seen:
                seen.add((dev, code))
                result.reasons.append(f"kernel log: Xid {code} on {dev} ({CRITICAL_XIDS[code]})")
        if seen:
            result.fixes.append("reboot the machine; if the Xid returns, check power/cooling or the card")
    if required_free_bytes is not None and free < required_free_bytes:
        gib = 1024 ** 3
        result.reasons.append(f"{free / gib:.2f} GiB VRAM free, the plan needs {required_free_bytes / gib:.2f} GiB")
        result.fixes.append("close programs holding VRAM (`vlkit wsl restart` lists them), or choose a smaller "
                            "profile/model: `vlkit plan`")
    result.ok = not result.reasons
    return result


def gate(required_free_bytes: int | None, gpu_index: int = 0, timeout: float = SMI_TIMEOUT_S) -> GateResult:
    """Run nvidia-smi (and read dmesg when allowed) and judge. Never raises."""
    smi = find_nvidia_smi()
    if smi is None:
        from wsl.host import detect_platform
        fix = ("install the NVIDIA driver in Windows (never inside WSL), then `wsl --shutdown`"
               if detect_platform().is_wsl else "install the NVIDIA driver (Ubuntu: `sudo ubuntu-drivers install`) and reboot")
        return GateResult(False, ["nvidia-smi not found: no NVIDIA driver on this machine"], [fix])
    try:
        proc = subprocess.run([smi, *SMI_QUERY], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 and "Invalid" in proc.stdout + proc.stderr:  # a driver without ROW_REMAPPER
            proc = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return GateResult(False, [f"nvidia-smi did not answer within {timeout:.0f} s: the driver is hung"],
                          ["WSL2: `vlkit wsl restart` (wsl --shutdown); Linux: reboot"])
    except OSError as exc:
        return GateResult(False, [f"cannot run {smi}: {exc.strerror}"], ["reinstall the NVIDIA driver"])
    if proc.returncode != 0:
        first = (proc.stdout + proc.stderr).strip().splitlines()
        return GateResult(False, [f"nvidia-smi failed: {first[0] if first else proc.returncode}"],
                          ["WSL2: update the Windows NVIDIA driver, then `wsl --shutdown`; Linux: reboot, "
                           "or reinstall the driver if it persists"])
    return evaluate(proc.stdout, required_free_bytes, _read_dmesg(), gpu_index)
