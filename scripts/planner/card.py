"""The card a plan is for: measured through NVML, or a size the user names (--gpu-memory)."""
from __future__ import annotations

from dataclasses import dataclass

from scripts.usage import setting
from service.sizing import GIB, MIB

# Planning a card by its size (--gpu-memory): what a desktop holds on it. The seeds' WSL2 machine
# showed Xwayland 623 MB + ~200 MB for the system on an 8 GB card.
DESKTOP_RESERVE_BYTES = 800 * MIB
START_SLACK_BYTES = 192 * MIB      # free memory moves between planning and start-up: kept unplanned


@dataclass(frozen=True)
class Card:
    total: int       # bytes, per GPU (the smallest of them)
    free: int        # bytes free before anything starts (the least of them)
    count: int       # GPUs used (tensor parallel)
    label: str       # what the budget table calls it
    measured: bool   # NVML's figures, not a size given by the user

    def plan_fields(self) -> dict:
        """The card as a Plan records it."""
        return dict(gpu=self.label, gpu_total_bytes=self.total, gpu_free_bytes=self.free, gpu_count=self.count)


def card_for(gpus, gpu_memory_bytes: int | None, gpu_count: int) -> Card:
    """The card of a given size (a desktop's share assumed in use), else the first ``gpu_count``
    GPUs of ``gpus`` (detected through NVML when None)."""
    if gpu_count < 1:
        raise ValueError(f"{setting('gpus')} must be at least 1")
    if gpu_memory_bytes is not None:
        return Card(gpu_memory_bytes, max(0, gpu_memory_bytes - DESKTOP_RESERVE_BYTES), gpu_count,
                    f"{gpu_count} x {gpu_memory_bytes / GIB:.1f} GiB (planned; {DESKTOP_RESERVE_BYTES // MIB} MiB "
                    f"assumed for the desktop)", False)
    if gpus is None:
        from scripts.gpu import detect_gpus  # lazily: NVML is only needed when nothing was given
        gpus = detect_gpus()
    if not gpus:
        raise ValueError(f"no NVIDIA GPU found: plan for a card with {setting('gpu_memory')} "
                         f"(e.g. {setting('gpu_memory', '8GiB')})")
    if gpu_count > len(gpus):
        size = f"{min(g.total_bytes for g in gpus) / GIB:.0f}GiB"
        raise ValueError(f"{setting('gpus', gpu_count)}, but {len(gpus)} GPU(s) found here; to plan for "
                         f"{gpu_count} cards like them elsewhere give their size too: "
                         f"{setting('gpus', gpu_count)} {setting('gpu_memory', size)}")
    # The first N by index: compose reserves `count: N` GPUs, which Docker takes from index 0 (the
    # health gate and the doctor look at GPU 0 too), so planning for the emptiest card would plan
    # for a GPU the container does not get.
    used = sorted(gpus, key=lambda g: g.index)[:gpu_count]
    # Tensor parallel ranks are equal: the smallest card and the least free memory bound them all.
    total, free = min(g.total_bytes for g in used), min(g.free_bytes for g in used)
    names = ", ".join(sorted({g.name for g in used}))
    return Card(total, free, gpu_count, f"{gpu_count} x {names} ({total / GIB:.2f} GiB, "
                f"{free / GIB:.2f} GiB free)", True)
