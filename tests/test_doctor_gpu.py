"""scripts/gpu.py: parsers fed with real nvidia-smi outputs, and discovery through a replayed nvidia-smi."""
from __future__ import annotations

import os

import pytest

from scripts import gpu
from tests.doctor_helpers import H100, PUBLIC, h100_smi, read

MIB = 1024 * 1024


def test_query_gpu_csv_h100_with_and_without_header():
    fields = ("index", "name", "uuid", "memory.total", "memory.used", "memory.free", "driver_version", "compute_cap")
    plain = gpu.parse_gpu_query_csv(read(H100 / "query-gpu.csv"), fields)
    header = gpu.parse_gpu_query_csv(read(H100 / "query-gpu-header.csv"), fields)
    for gpus in (plain, header):
        assert len(gpus) == 1
        g = gpus[0]
        assert g.name == "NVIDIA H100 80GB HBM3"
        assert g.total_bytes == 81559 * MIB and g.free_bytes == 81079 * MIB
        # memory.used says 0 but 480 MiB are driver-reserved: used is what we cannot have
        assert g.used_bytes == 480 * MIB
        assert g.compute_capability == (9, 0)
        assert g.driver_version == "580.159.04"
        assert g.uuid == "GPU-51081e17-a187-2520-4efa-5d1a18eca5f5"


def test_query_gpu_csv_rejects_short_rows():
    with pytest.raises(ValueError):
        gpu.parse_gpu_query_csv("0, NVIDIA H100 80GB HBM3\n")


@pytest.mark.parametrize("path, driver, cuda", [
    (H100 / "nvidia-smi.txt", "580.159.04", "13.0"),
    (H100 / "nvidia-smi-q.txt", "580.159.04", "13.0"),
    (PUBLIC / "wsl2-rtx3070-nvidia-smi.txt", "526.98", "12.0"),  # WSL: the Windows driver's number
    (PUBLIC / "linux-2x3090-driver610-nvidia-smi.txt", "610.57.04", "13.3"),  # "KMD" / "CUDA UMD"
    (PUBLIC / "linux-k80-driver390-nvidia-smi.txt", "390.30", None),  # no CUDA in the header
])
def test_driver_and_cuda_from_real_headers(path, driver, cuda):
    assert gpu.parse_smi_header(read(path)) == (driver, cuda)


def test_process_table_old_layout_and_none():
    procs = gpu.parse_smi_processes(read(PUBLIC / "linux-k80-driver390-nvidia-smi.txt"))
    assert procs == [(0, gpu.GpuProcess(3701, "python", 10436 * MIB))]
    assert gpu.parse_smi_processes(read(H100 / "nvidia-smi.txt")) == []  # "No running processes found"


def test_compute_apps_csv_empty_and_not_available():
    assert gpu.parse_compute_apps_csv(read(H100 / "query-apps.csv")) == []
    # nvidia-smi's placeholders for unreadable values become None, never a number
    for placeholder in ("[N/A]", "[Not Supported]", "N/A"):
        assert gpu._mib(placeholder) is None


def test_nvsmi_q_tree():
    q = gpu.parse_nvsmi_q(read(H100 / "nvidia-smi-q.txt"))
    assert q["Driver Version"] == "580.159.04" and q["CUDA Version"] == "13.0"
    assert len(q["GPUs"]) == 1
    g = q["GPUs"][0]
    assert g["Product Name"] == "NVIDIA H100 80GB HBM3"
    assert g["FB Memory Usage"] == {"Total": "81559 MiB", "Reserved": "480 MiB", "Used": "0 MiB", "Free": "81079 MiB"}
    assert g["MIG Mode"]["Current"] == "Disabled"


def test_cuda_version_from_nvml_int():
    assert gpu.cuda_version_from_int(13000) == "13.0"
    assert gpu.cuda_version_from_int(12080) == "12.8"


def test_probe_on_this_machine_says_why_nothing_was_found(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.setattr(gpu, "WSL_LIB_DIR", str(tmp_path / "nowhere"))
    result = gpu.probe()
    assert result.gpus == [] and result.source is None
    assert "NVML" in result.error and "nvidia-smi not found" in result.error
    assert gpu.detect_gpus() == []


def test_probe_falls_back_to_nvidia_smi(monkeypatch, tmp_path):
    h100_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = gpu.probe()  # NVML has no library here, so this is the nvidia-smi path end to end
    assert result.source == "nvidia-smi" and result.nvidia_smi.endswith("nvidia-smi")
    [g] = result.gpus
    assert (g.name, g.driver_version, g.cuda_driver_version) == ("NVIDIA H100 80GB HBM3", "580.159.04", "13.0")
    assert g.free_bytes == 81079 * MIB and g.processes == []


def test_probe_reports_a_driver_that_does_not_answer(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat '{PUBLIC / 'wsl-nvidia-smi-driver-not-loaded.txt'}'\nexit 9\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = gpu.probe()
    assert result.gpus == []
    assert "couldn't communicate with the NVIDIA driver" in result.error


BUSY = H100.parent / "h100-busy"


def test_real_process_row_of_a_busy_h100_in_every_view():
    """Recorded on the GPU machine while a torch process (pid 437) held a 2 GiB tensor."""
    [card] = gpu.parse_gpu_query_csv(read(BUSY / "busy-query-gpu.csv"))
    assert card.name == "NVIDIA H100 80GB HBM3" and card.total_bytes == 81559 * 2**20
    assert card.used_bytes >= 2 * 2**30
    [(uuid, proc)] = gpu.parse_compute_apps_csv(read(BUSY / "busy-query-apps.csv"))
    assert uuid == card.uuid
    assert (proc.pid, proc.name, proc.used_bytes) == (437, "python3", 2566 * 2**20)
    [(index, table_proc)] = gpu.parse_smi_processes(read(BUSY / "busy-nvidia-smi.txt"))
    assert index == 0 and table_proc.pid == 437 and table_proc.used_bytes == 2566 * 2**20
