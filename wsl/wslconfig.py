"""Read and edit the Windows `.wslconfig` without disturbing anything we did not mean to change.

The file is the user's: comments, blank lines, order, unknown sections and keys, key spelling, the
encoding (UTF-8, UTF-8 with BOM, UTF-16 LE with BOM as Notepad writes it) and the line endings all
survive byte for byte; only the values we set change. Writes are atomic (a temporary file in the
same folder, then os.replace) and follow a timestamped backup; when nothing would change, nothing is
written and no backup is made, so running the edit twice is a no-op.

Why hand-written: configparser drops comments and lower-cases keys, and the host side may not pull
extra dependencies. The format is small: `[section]`, `key = value`, `#`/`;` comments.
"""
from __future__ import annotations

import codecs
import difflib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

SECTION = "wsl2"
GIB = 1024 ** 3

_SECTION_RE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(?:[#;].*)?$")
# key, separator (spaces and '=' kept as written), value, then an optional trailing comment
_KEY_RE = re.compile(r"^(?P<indent>\s*)(?P<key>[^=#;\[\s][^=]*?)(?P<sep>\s*=\s*)(?P<value>.*?)(?P<tail>\s+[#;].*)?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|K|M|G|T)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "G": GIB, "GB": GIB,
          "T": 1024 ** 4, "TB": 1024 ** 4}


class WslConfigError(Exception):
    """The file cannot be read or understood; it was left untouched."""


# --------------------------------------------------------------------------- sizes

def parse_size(text: str) -> int:
    """'12GB' / '8192MB' / '12g' -> bytes (WSL reads these units as powers of 1024).

    Not scripts.planner.sizes.parse_size on purpose: that one reads a bare number as GiB and accepts
    KiB/MiB/GiB, while WSL reads a bare number as bytes and knows no *iB spelling, so accepting
    '12GiB' here would write a value WSL ignores."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 12GB or 8192MB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def format_size(n_bytes: int) -> str:
    """Bytes -> '12GB' when whole GiB, else 'NNNNMB'."""
    if n_bytes % GIB == 0:
        return f"{n_bytes // GIB}GB"
    return f"{n_bytes // 1024 ** 2}MB"


def _same_value(key: str, old: str, new: str) -> bool:
    old, new = old.strip().strip('"'), new.strip().strip('"')
    if old.lower() == new.lower():
        return True
    if key.lower() in ("memory", "swap"):
        try:
            return parse_size(old) == parse_size(new)
        except ValueError:
            return False
    return False


# --------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class WslConfig:
    path: Path
    exists: bool
    encoding: str  # codec for the body: "utf-8", "utf-16-le" or "utf-16-be"
    bom: bytes  # b"" or the BOM that was there, written back as is
    newline: str  # the file's dominant line ending, used for lines we add
    lines: tuple[str, ...]  # with their own line endings, exactly as read

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def to_bytes(self) -> bytes:
        return self.bom + self.text.encode(self.encoding)


def decode(data: bytes) -> tuple[str, str, bytes]:
    """bytes -> (text, codec, bom). Raises WslConfigError for text we cannot read safely."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            body, encoding = data[len(bom):], enc
            break
    else:
        bom = b""
        # UTF-16 without BOM: every other byte of ASCII text is NUL
        if len(data) >= 2 and data[1:2] == b"\x00" and data[0:1] != b"\x00":
            body, encoding = data, "utf-16-le"
        elif len(data) >= 2 and data[0:1] == b"\x00" and data[1:2] != b"\x00":
            body, encoding = data, "utf-16-be"
        else:
            body, encoding = data, "utf-8"
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError as exc:
        raise WslConfigError(f"not UTF-8 or UTF-16 text ({exc.reason} at byte {exc.start}); "
                             "save it from Notepad as UTF-8 and run again") from None
    if "\x00" in text:
        raise WslConfigError("the file contains NUL characters: not a text file")
    return text, encoding, bom


def _dominant_newline(text: str) -> str:
    crlf = text.count("\r\n")
    lf = text.count("\n") - crlf
    if crlf == 0 and lf == 0:
        return "\r\n"  # a Windows file: CRLF unless the file says otherwise
    return "\r\n" if crlf >= lf else "\n"


def _strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


def validate(lines: tuple[str, ...]) -> None:
    for number, line in enumerate(lines, 1):
        body = _strip_eol(line).strip()
        if not body or body[0] in "#;" or _SECTION_RE.match(body) or _KEY_RE.match(body):
            continue
        raise WslConfigError(f"line {number} is not `[section]`, `key = value` or a # comment: {body[:60]!r}")


def load(path: Path) -> WslConfig:
    """Read .wslconfig (a missing file reads as empty, to be created with CRLF and UTF-8)."""
    path = Path(path)
    if not path.exists():
        return WslConfig(path, False, "utf-8", b"", "\r\n", ())
    if path.is_dir():
        raise WslConfigError(f"{path} is a folder")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WslConfigError(f"cannot read {path}: {exc.strerror}") from None
    text, encoding, bom = decode(data)
    lines = tuple(text.splitlines(keepends=True))
    validate(lines)
    return WslConfig(path, True, encoding, bom, _dominant_newline(text), lines)


def _sections(lines: tuple[str, ...]):
    """Yield (section name lower-cased or None before the first header, line index, match|None)."""
    current = None
    for i, line in enumerate(lines):
        body = _strip_eol(line)
        m = _SECTION_RE.match(body)
        if m:
            current = m.group(1).strip().lower()
            yield current, i, None
            continue
        stripped = body.strip()
        if stripped and stripped[0] not in "#;":
            yield current, i, _KEY_RE.match(body)


def get(cfg: WslConfig, key: str, section: str = SECTION) -> str | None:
    """The value WSL will use (the last one, if the key repeats); keys match case-insensitively."""
    value = None
    for sec, _, m in _sections(cfg.lines):
        if sec == section.lower() and m and m.group("key").strip().lower() == key.lower():
            value = m.group("value").strip()
    return value


def with_values(cfg: WslConfig, values: dict[str, str], section: str = SECTION) -> WslConfig:
    """A copy of cfg with `values` set in [section] (pure). Existing keys keep their spelling, spacing
    and trailing comment; new keys go after the section's last key; a missing section is appended."""
    lines = list(cfg.lines)
    nl = cfg.newline
    pending = {k.lower(): (k, v) for k, v in values.items()}
    header_at = None
    last_key_at = None
    for sec, i, m in _sections(cfg.lines):
        if sec != section.lower():
            continue
        if m is None:  # the section header (again, if the section repeats)
            header_at = i if header_at is None else header_at
            last_key_at = i if last_key_at is None else last_key_at
            continue
        last_key_at = i
        key = m.group("key").strip().lower()
        if key in pending:
            _, new = pending[key]
            if not _same_value(key, m.group("value"), new):
                eol = lines[i][len(_strip_eol(lines[i])):]
                lines[i] = (m.group("indent") + m.group("key") + m.group("sep") + new
                            + (m.group("tail") or "") + eol)
    present = {m.group("key").strip().lower() for sec, _, m in _sections(cfg.lines)
               if sec == section.lower() and m}
    missing = [(k, v) for low, (k, v) in pending.items() if low not in present]
    if missing:
        added = [f"{k}={v}{nl}" for k, v in missing]
        if header_at is None:
            if lines and not lines[-1].endswith(("\n", "\r")):
                lines[-1] += nl
            if lines and _strip_eol(lines[-1]).strip():
                lines.append(nl)  # a blank line before the new section
            lines.append(f"[{section}]{nl}")
            lines.extend(added)
        else:
            at = last_key_at
            if not lines[at].endswith(("\n", "\r")):
                lines[at] += nl
            lines[at + 1:at + 1] = added
    return replace(cfg, lines=tuple(lines))


def diff(old: WslConfig, new: WslConfig) -> str:
    """A unified diff of the two texts (line endings not shown)."""
    return "".join(difflib.unified_diff(
        [_strip_eol(x) + "\n" for x in old.lines], [_strip_eol(x) + "\n" for x in new.lines],
        fromfile=f"{old.path} (now)", tofile=f"{new.path} (after)"))


def backup_path(path: Path, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate = path.with_name(f"{path.name}.vlkit-{stamp}.bak")
    n = 1
    while candidate.exists():  # two runs in one second keep both backups
        candidate = path.with_name(f"{path.name}.vlkit-{stamp}-{n}.bak")
        n += 1
    return candidate


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            try:
                shutil.copymode(path, tmp)
            except OSError:
                pass  # drvfs (/mnt/c) may not keep Unix modes; the content is what matters
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass(frozen=True)
class ApplyResult:
    changed: bool
    diff: str
    backup: Path | None
    written: bool


def apply(path: Path, values: dict[str, str], dry_run: bool = False) -> ApplyResult:
    """Set [wsl2] values in the file at path: backup, then atomic write. dry_run changes nothing."""
    old = load(path)
    new = with_values(old, values)
    new_bytes = new.to_bytes()
    unchanged = new_bytes == path.read_bytes() if old.exists else not new.lines
    if unchanged:
        return ApplyResult(False, "", None, False)
    text_diff = diff(old, new)
    if dry_run:
        return ApplyResult(True, text_diff, None, False)
    backup = None
    if old.exists:
        backup = backup_path(old.path)
        shutil.copy2(old.path, backup)
    else:
        old.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(old.path, new_bytes)
    return ApplyResult(True, text_diff, backup, True)


# --------------------------------------------------------------------------- recommendation

# The WSL VM must hold the container, Python and the model weights on their way to the GPU.
PROFILE_MIN_VM_GIB = {"8gb": 8, "16gb": 12}


@dataclass(frozen=True)
class Recommendation:
    memory: str
    swap: str
    processors: int | None  # None: leave WSL's default (all logical processors)
    rule: str
    warning: str | None  # when the host is too small for the profile


def recommend(host_ram_bytes: int, profile: str = "8gb") -> Recommendation:
    """memory = host RAM minus what Windows keeps (4 GB up to a 16 GB host, 8 GB above), at most 75%
    of the host; swap = 8 GB (4 GB on hosts under 16 GB) so loading peaks page out instead of the OOM
    killer ending the server; processors: WSL's default (all) is right, so we leave it unset."""
    host_gib = host_ram_bytes / GIB
    keep = 4 if host_gib <= 16.5 else 8
    memory_gib = int(min(host_gib - keep, host_gib * 0.75))
    need = PROFILE_MIN_VM_GIB.get(profile, 8)
    warning = None
    if memory_gib < need:
        warning = (f"this PC has {host_gib:.0f} GB of RAM; the {profile} profile wants {need} GB for WSL "
                   f"and Windows needs about {keep} GB: close other programs or add RAM")
        memory_gib = max(memory_gib, min(need, int(host_gib) - 2))
    memory_gib = max(memory_gib, 2)
    swap_gib = 8 if host_gib >= 15.5 else 4
    rule = (f"host RAM {host_gib:.0f} GB - {keep} GB kept for Windows, at most 75% -> memory={memory_gib}GB; "
            f"swap={swap_gib}GB; processors left at WSL's default (all)")
    return Recommendation(f"{memory_gib}GB", f"{swap_gib}GB", None, rule, warning)
