#!/usr/bin/env bash
# Record real outputs on a GPU machine for the doctor's tests (tests/data/nvidia-smi/<name>/) and
# show `vlkit doctor` there. Writes at most 8 files to $OUT (default ./gpu-recording):
#   busy-nvidia-smi.txt      `nvidia-smi` while a CUDA process holds ~2 GiB (a real Processes row)
#   busy-query-gpu.csv       scripts.gpu's exact --query-gpu CSV, same moment
#   busy-query-apps.csv      scripts.gpu's exact --query-compute-apps CSV, same moment
#   busy-nvidia-smi-q.txt    the health gate's `nvidia-smi -q -d MEMORY,ECC,PAGE_RETIREMENT,ROW_REMAPPER`
#   probe.json               scripts.gpu.probe() through NVML and through the nvidia-smi fallback
#   doctor.json              `vlkit doctor --json`
#   doctor.txt               `vlkit doctor` (human) with its wall time, `vlkit health` idle and busy,
#                            whether dmesg is readable and its Xid lines
#   SOURCE.md                what ran, when, on what
# Needs python3 with pydantic, pydantic-settings, rich, nvidia-ml-py, huggingface_hub; when they are
# missing, WHEELS=<dir of wheels> installs them into /tmp/vlkit-record-pkgs (on PYTHONPATH).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-./gpu-recording}
mkdir -p "$OUT"
PY=python3
if ! $PY -c "import pydantic, pydantic_settings, rich, pynvml, huggingface_hub" 2>/dev/null; then
    if [ -z "${WHEELS:-}" ]; then
        echo "host packages missing: set WHEELS=<wheel dir>" >&2
        exit 2
    fi
    # --target, not a venv: python3-venv is not on every machine; the machine's torch stays visible
    $PY -m pip install -q --no-index --find-links "$WHEELS" --target /tmp/vlkit-record-pkgs \
        pydantic pydantic-settings rich nvidia-ml-py huggingface_hub PyYAML || exit 2
    export PYTHONPATH=/tmp/vlkit-record-pkgs${PYTHONPATH:+:$PYTHONPATH}
fi
SMI=$(command -v nvidia-smi || echo /usr/lib/wsl/lib/nvidia-smi)
GPU_FIELDS=$($PY -c "from scripts.gpu import GPU_QUERY_FIELDS as f; print(','.join(f))")
APP_FIELDS=$($PY -c "from scripts.gpu import APPS_QUERY_FIELDS as f; print(','.join(f))")
# Only the doctor's own subcommands, so the recording does not depend on the other areas' modules.
vlkit() {
    $PY -c 'import argparse, sys
from scripts.doctor import cli
p = argparse.ArgumentParser(prog="vlkit"); cli.register(p.add_subparsers())
a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))' "$@"
}

{
    echo "# vlkit doctor (idle GPU)"
    TIMEFORMAT="wall time: %R s"
    time { vlkit doctor; echo "exit code: $?"; }
    echo
    echo "# vlkit health --profile 8gb (idle)"
    vlkit health --profile 8gb; echo "exit code: $?"
} >"$OUT/doctor.txt" 2>&1
vlkit doctor --json >"$OUT/doctor.json" 2>>"$OUT/doctor.txt"

# A real CUDA process holding VRAM, so the process views have a row to parse.
$PY - <<'EOF' &
import time, torch
x = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
open("/tmp/vlkit-holder-ready", "w").close()
time.sleep(120)
EOF
HOLDER=$!
rm -f /tmp/vlkit-holder-ready
for _ in $(seq 60); do [ -e /tmp/vlkit-holder-ready ] && break; sleep 1; done
"$SMI" >"$OUT/busy-nvidia-smi.txt" 2>&1
"$SMI" --query-gpu="$GPU_FIELDS" --format=csv,noheader,nounits >"$OUT/busy-query-gpu.csv" 2>&1
"$SMI" --query-compute-apps="$APP_FIELDS" --format=csv,noheader,nounits >"$OUT/busy-query-apps.csv" 2>&1
"$SMI" -q -d MEMORY,ECC,PAGE_RETIREMENT,ROW_REMAPPER >"$OUT/busy-nvidia-smi-q.txt" 2>&1
$PY - >"$OUT/probe.json" 2>&1 <<'EOF'
import dataclasses, json
from scripts import gpu
nvml = gpu._probe_nvml()
smi = gpu._probe_nvidia_smi(gpu.find_nvidia_smi(), 10)
print(json.dumps({"nvml": dataclasses.asdict(nvml), "nvidia_smi": dataclasses.asdict(smi)}, indent=1))
EOF
{
    echo
    echo "# vlkit health --profile 8gb (2 GiB held by pid $HOLDER)"
    vlkit health --profile 8gb --json; echo "exit code: $?"
    echo
    echo "# vlkit doctor (2 GiB held)"
    vlkit doctor; echo "exit code: $?"
    echo
    echo "# dmesg"
    if dmesg >/dev/null 2>&1; then echo "readable; Xid lines:"; dmesg | grep -i "xid" | tail -20; else echo "not readable"; fi
} >>"$OUT/doctor.txt" 2>&1
kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null

cat >"$OUT/SOURCE.md" <<EOF
Recorded $(date -u +%Y-%m-%dT%H:%MZ) by scripts/doctor/record_gpu_outputs.sh on $(hostname)
GPU: $("$SMI" --query-gpu=name,driver_version --format=csv,noheader | head -1); kernel $(uname -r)
nvidia-smi: $SMI; python: $($PY --version 2>&1)
- busy-*: taken while a torch process (pid $HOLDER) held a 2 GiB tensor
- busy-query-gpu.csv: nvidia-smi --query-gpu=$GPU_FIELDS --format=csv,noheader,nounits
- busy-query-apps.csv: nvidia-smi --query-compute-apps=$APP_FIELDS --format=csv,noheader,nounits
- busy-nvidia-smi-q.txt: nvidia-smi -q -d MEMORY,ECC,PAGE_RETIREMENT,ROW_REMAPPER
EOF
ls -l "$OUT"
