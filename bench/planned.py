"""What ``vlkit plan --json`` says for a checkpoint on a card, for the benchmarks that start the
service (or vLLM) with the planner's settings: run from the checkout (the image has no host tools)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Plan:
    def __init__(self, ckpt: Path, profile: str, card: str):
        out = subprocess.run([sys.executable, "-m", "scripts", "plan", "--json", "--model", str(ckpt), "--profile",
                              profile, "--gpu-memory", card], capture_output=True, text=True, cwd=ROOT)
        try:  # a plan, whether it fits (exit 0) or not (3); nothing on stdout when the command failed
            plan = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"vlkit plan failed (exit {out.returncode}): {out.stderr.strip()}") from None
        self.fits, self.service_env, self.vllm_args = plan["fits"], plan["service_env"], plan["vllm_args"]
        self.gpu_total_bytes = plan["gpu_total_bytes"]

    def service_flags(self) -> list[str]:
        """The plan's ``VLKIT_*`` settings as the service's flags (``VLKIT_MAX_MODEL_LEN`` ->
        ``--max-model-len``), the model left out: the caller names its checkpoint."""
        flags = []
        for name, value in self.service_env.items():
            if name != "VLKIT_MODEL":
                flags += ["--" + name.removeprefix("VLKIT_").lower().replace("_", "-"), value]
        return flags
