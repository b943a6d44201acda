"""Edits of a user's file that lose nothing: a backup first, an atomic write, one run at a time.

- make_backup: a new file created with O_EXCL, so two runs in the same second never pick the same name
  (the old check-then-copy could, and the second copy overwrote the first backup).
- write_atomic: a temporary file beside the target, fsync, then os.replace; for a user's file, refused
  when the target no longer holds the bytes the edit started from (another program saved it meanwhile).
  Files vlkit regenerates (vlkit.env, vlkit.compose.yaml) go through it too, without that check.
- edit_lock: vlkit runs on one file take turns (flock on the file, re-taken if a run before us
  replaced it), so each run edits what the previous one wrote.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path


class FileEditError(Exception):
    """The file cannot be read or edited safely; it was left untouched."""


def open_regular(path: Path):
    """Open for reading without blocking on a FIFO; anything but a regular file is refused."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileEditError("it is not a regular file")
    return os.fdopen(fd, "rb")


def make_backup(path: Path, data: bytes, like: os.stat_result | None = None, now: float | None = None) -> Path:
    """A new file beside `path` holding `data`. O_EXCL: a name another run took in the same second is
    never reused or overwritten; we take the next one."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    mode = stat.S_IMODE(like.st_mode) if like else 0o644
    for n in range(1000):
        candidate = path.with_name(f"{path.name}.vlkit-{stamp}{f'-{n}' if n else ''}.bak")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode | 0o200)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        if like:
            try:
                os.utime(candidate, ns=(like.st_atime_ns, like.st_mtime_ns))
            except OSError:
                pass
        return candidate
    raise FileEditError(f"1000 backups of {path.name} in one second already exist; nothing was written")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _current_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


_UNCHECKED = object()


def write_atomic(path: Path, data: bytes, expect: bytes | None | object = _UNCHECKED) -> None:
    """Readers see the old file or the new one, never half of one. `expect`: the bytes the file must
    still hold (None: it must still be absent); otherwise another program changed it and we stop.
    Without it (a file vlkit regenerates) the file is replaced whatever it holds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:  # the file's own mode, or a new file's as open() would make it (mkstemp's is 0600)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        except OSError:
            pass  # drvfs (/mnt/c) may not keep Unix modes; the content is what matters
        if expect is not _UNCHECKED and _current_bytes(path) != expect:
            raise FileEditError("another program changed it while vlkit was editing it; nothing was written, run again")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def edit_lock(target: Path):
    """Serialise vlkit runs editing one file: flock the target, and if a run before us replaced it
    (so we hold a lock on the old file), lock the new one. Best effort where the file system has no
    locks; the compare-before-rename in write_atomic still stops a lost update there."""
    for _ in range(100):
        try:
            f = open_regular(target)
        except (OSError, FileEditError):
            yield  # absent, or not a file we edit: load says why
            return
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except OSError:
                yield
                return
            try:
                same = os.stat(target).st_ino == os.fstat(f.fileno()).st_ino
            except OSError:
                same = False
            if same:
                yield
                return
    raise FileEditError("it keeps being replaced by another program; run again")
