"""What `vlkit plan` answers (and `--json` prints): a plan, or a refusal, with its budget table."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Profile = Literal["8gb", "16gb"]   # the engines: vlkit's service, vLLM (not card sizes)


def _vllm_version() -> str:
    try:
        from scripts.images import VLLM_VERSION
        return VLLM_VERSION
    except ImportError:  # pragma: no cover - the docker area always ships it
        return "unknown"


class BudgetRow(BaseModel):
    name: str
    gib: float
    note: str = ""


class Plan(BaseModel):
    fits: bool
    profile: Profile
    model: str
    context: int
    vllm_args: list[str] = Field(default_factory=list)
    service_env: dict[str, str] = Field(default_factory=dict)
    required_free_bytes: int = 0
    refusal: str | None = None
    budget: list[BudgetRow] = Field(default_factory=list)
    gpu: str = ""
    gpu_total_bytes: int = 0
    gpu_free_bytes: int = 0
    gpu_count: int = 1
    kv_cache_tokens: int = 0
    concurrent_sequences: float = 0.0
    evaluated: bool = False           # --gpu-memory-utilization given: vLLM's defaults evaluated
    vllm_version: str = Field(default_factory=_vllm_version)
    auto_reason: str | None = None    # --profile auto: why this profile, in one line (also notes[0])
    notes: list[str] = Field(default_factory=list)

    def to_dict(self) -> dict:
        return self.model_dump()
