"""One doctor check: a status mark, what was found, the fix."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel

Status = Literal["ok", "warn", "fail"]


class Check(BaseModel):
    name: str
    status: Status
    found: str
    fix: Optional[str] = None
    blocking: bool = False  # true: this result stops `make up` (the doctor exits 1)


def ok(name: str, found: str, fix: str | None = None) -> Check:
    return Check(name=name, status="ok", found=found, fix=fix)


def warn(name: str, found: str, fix: str | None = None) -> Check:
    return Check(name=name, status="warn", found=found, fix=fix)


def fail(name: str, found: str, fix: str | None, blocking: bool = True) -> Check:
    return Check(name=name, status="fail", found=found, fix=fix, blocking=blocking)


def gib(n_bytes: int | float) -> str:
    return f"{n_bytes / 1024 ** 3:.1f} GiB"
