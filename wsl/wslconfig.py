"""Edit the Windows `.wslconfig` so that WSL applies exactly what we wrote, disturbing nothing else.

What WSL reads is decided by wsl/wslconfig_parser.py, a port of WSL's own parser (microsoft/WSL
src/shared/configfile/configfile.cpp `ParseConfigFile`); this module only edits. We replace the value
of the assignment WSL applies (the first `memory=` in [wsl2]; its key, spacing and trailing `#`
comment stay), add missing keys after the last [wsl2] key (or a new [wsl2] at the end of what WSL
reads), then read the result again with the same parser and refuse unless WSL would apply our values
and everything else exactly as before.

The file is the user's: every other byte (comments, order, unknown keys, the encoding and BOM, the
line endings) survives. A `.wslconfig` that is a symbolic link stays one: its target is edited. The
write itself (backup first, atomic replace, one run at a time) is scripts/safe_file.py's. When nothing
would change, nothing is written.

Why no INI library: none reads this format the way WSL does (`;` is not a comment, `4GB#x` is 4GB,
only `\\n` ends a line, the first repeated key wins), and configparser drops comments.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from wsl import wslconfig_parser as parser
from scripts.safe_file import FileEditError, edit_lock, make_backup, open_regular, write_atomic

SECTION = "wsl2"
GIB = 1024 ** 3
MAX_BYTES = 1 << 20  # far above any real .wslconfig; a bigger file is not one
MIN_MEMORY = 256 * 1024 ** 2  # WslCoreConfig.cpp Config::Initialize: WSL raises a smaller memory to 256 MB
SIZE_KEYS = ("memory", "swap")
# what WSL uses when a key is absent or its value is rejected (WslCoreConfig.cpp Config::Initialize)
DEFAULTS = {"memory": "half the host RAM", "swap": "a quarter of the memory", "processors": "all logical processors"}


WslConfigError = FileEditError  # the file cannot be read or edited safely; it was left untouched


# --------------------------------------------------------------------------- sizes

def parse_size(text: str) -> int:
    """A size as WSL reads memory= and swap= (stringshared.h ParseMemorySize) -> bytes.

    Not scripts.planner.sizes.parse_size on purpose: WSL reads a bare number as bytes, its units are
    upper-case and powers of 1024 (12GB, 12G, 8192MB), and it knows no decimals, spaces or *iB."""
    n = parser.parse_memory_size(text or "")
    if n is None:
        hint = text.strip().upper().replace(" ", "").replace("IB", "B") if text else ""
        if hint != text and parser.parse_memory_size(hint) is not None and re.fullmatch(r"\d+[A-Z]*", hint):
            why = [w for w, bad in (("no spaces", " " in text), ("GB, not GiB: its GB is 1024^3 already", "ib" in text.lower()),
                                    ("upper-case units", any(c.islower() for c in text.replace("iB", "").replace("ib", ""))))
                   if bad]
            better = f" (WSL reads {', '.join(why)}: {hint})"
        else:
            better = ""
        raise ValueError(f"not a size WSL reads: {text!r}{better}; write digits then B, KB, MB, GB or TB, e.g. 12GB or 8192MB")
    return n


def parse_size_to_write(text: str) -> int:
    """A size we write for the user: what WSL reads (parse_size), but only digits and a unit, no sign
    and no wrap past 2^64 (WSL would read -1 as 16 EiB, and take all of the PC's RAM)."""
    n = parse_size(text)
    m = re.fullmatch(r"(\d+)([A-Z]*)", text)
    factor = next((f for unit, f in parser._SIZE_UNITS if m and m.group(2) in (unit, unit[0])), 1)
    if m is None or int(m.group(1)) * factor >= parser.U64:
        raise ValueError(f"{text!r} is not a size to give WSL: write digits then B, KB, MB, GB or TB, e.g. 12GB")
    return n


def _parsed(key: str, value: str) -> int | None:
    return parser.parse_memory_size(value) if key in SIZE_KEYS else parser.parse_int(value) if key == "processors" else None


def _same_value(key: str, old: str, new: str) -> bool:
    """Would WSL apply the same setting? (12288MB is 12GB; a value WSL rejects equals nothing.)"""
    if old == new:
        return True
    a, b = _parsed(key, old), _parsed(key, new)
    return a is not None and a == b


# --------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class WslConfig:
    path: Path  # as the user named it
    target: Path  # the file itself: path, or where the symbolic link at path points
    exists: bool
    encoding: str  # codec for the body: "utf-8" or "utf-16-le"
    bom: bytes  # b"" or the BOM that was there, written back as is
    newline: str  # the file's dominant line ending, used for lines we add
    text: str
    reading: parser.Reading = field(repr=False)

    def to_bytes(self) -> bytes:
        return self.bom + self.text.encode(self.encoding)

    def with_text(self, text: str) -> "WslConfig":
        return WslConfig(self.path, self.target, self.exists, self.encoding, self.bom, self.newline, text, parser.read(text))


def _lines(text: str) -> list[str]:
    """Lines as WSL counts them: only LF ends one (not U+2028, form feed, ...), each with its ending."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _dominant_newline(text: str) -> str:
    crlf = text.count("\r\n")
    lf = text.count("\n") - crlf
    if crlf == 0 and lf == 0:
        return "\r\n"  # a Windows file: CRLF unless the file says otherwise
    return "\r\n" if crlf >= lf else "\n"


def _target(path: Path) -> Path:
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise WslConfigError(f"it is a symbolic link to {os.readlink(path)}, which cannot be opened (missing, "
                             "or a loop); WSL then uses its defaults") from None


def load(path: Path) -> WslConfig:
    """Read .wslconfig (a missing file reads as empty, to be created as UTF-8 with CRLF)."""
    path = Path(path)
    target = _target(path)
    try:
        st = target.stat()
    except FileNotFoundError:
        return WslConfig(path, target, False, "utf-8", b"", "\r\n", "", parser.read(""))
    except OSError as exc:
        raise WslConfigError(f"cannot read it: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise WslConfigError(f"it is a folder: name the file in it ({path / '.wslconfig'}); if WSL reads this "
                             "folder as its .wslconfig, it cannot open it and uses its defaults")
    try:
        with open_regular(target) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise WslConfigError(f"cannot read it: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise WslConfigError(f"it is over {MAX_BYTES // 1024} KiB: not a .wslconfig")
    try:
        text, encoding, bom = parser.decode(data)
    except parser.UnreadableError as exc:
        raise WslConfigError(str(exc)) from None
    cfg = WslConfig(path, target, True, encoding, bom, _dominant_newline(text), text, parser.read(text))
    if cfg.to_bytes() != data:  # guard for the byte-for-byte promise
        raise WslConfigError("its bytes would not survive a rewrite unchanged")
    return cfg


def get(cfg: WslConfig, key: str, section: str = SECTION) -> str | None:
    """The value WSL applies for [section] key (the first one if it repeats), or None when absent."""
    found = cfg.reading.first(f"{section}.{key}")
    return None if found is None else found.value


def applied_size(cfg: WslConfig, key: str) -> int | None:
    """The bytes WSL applies for [wsl2] memory/swap from the file; None when absent or rejected."""
    value = get(cfg, key)
    return None if value is None else parser.parse_memory_size(value)


def _shown(line: str) -> str:
    """A line for a terminal: U+2028, form feed and other invisible characters as escapes."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def findings(cfg: WslConfig, keys=("memory", "swap", "processors")) -> list[str]:
    """What WSL will skip, ignore or reject in the file, for `keys` and for lines it cannot parse; in
    file order."""
    r, text, out = cfg.reading, cfg.text, []
    for s in r.skipped:
        shown = _shown(_lines(text[s.start:])[0].rstrip("\r\n")[:60]) if s.start < len(text) else ""
        semicolon = " (`;` does not start a comment in .wslconfig: only `#` does)" if shown.startswith(";") else ""
        out.append((s.start, f"WSL skips `{shown}`: {s.reason}{semicolon}"))
    if r.end < len(text):
        out.append((r.end, "WSL stops reading at a Ctrl+Z character; the rest of the file is ignored"))
    for key in keys:
        first = r.first(f"{SECTION}.{key}")
        for a in (a for a in r.assignments if a.name == key):
            if a.section != SECTION:
                place = f"[{a.section}]" if a.section else "before any [section]"
                out.append((a.start, f"`{key}` is {place}; WSL reads it only from [{SECTION}]"))
            elif a is not first:
                out.append((a.start, f"a second `{key}` in [{SECTION}]: WSL keeps the first (line {line_of(text, first.start)})"))
            elif _parsed(key, a.value) is None:
                out.append((a.start, f"WSL rejects {key}={a.value!r} and uses its default ({DEFAULTS[key]})"))
    return [f"line {line_of(text, at)}: {message}" for at, message in sorted(out, key=lambda f: f[0])]


def _insertion(cfg: WslConfig, lines: list[str]) -> tuple[int, str]:
    """Where new [wsl2] lines go and the text to put there."""
    r, nl = cfg.reading, cfg.newline
    in_section = [a for a in r.assignments if a.section == SECTION]
    header = next((h for h in r.headers if h.name == SECTION), None)
    anchor = in_section[-1].end if in_section else header.end if header else None
    if anchor is None:  # a new [wsl2] section at the end of what WSL reads
        before = cfg.text[:r.end]
        lead = "" if not before or before.endswith("\n") else nl
        if (before + lead).strip():
            lead += nl  # a blank line before the new section
        return r.end, lead + f"[{SECTION}]{nl}" + "".join(lines)
    # a line ends with LF; a lone CR does not end a comment, so it gets one too
    lead = "" if anchor == 0 or cfg.text[anchor - 1] == "\n" else nl
    return anchor, lead + "".join(lines)


def _settings(reading: parser.Reading) -> dict[str, str]:
    """Every key WSL applies (first occurrence), lower-cased, with its value."""
    out: dict[str, str] = {}
    for a in reading.assignments:
        out.setdefault(a.key.lower(), a.value)
    return out


def with_values(cfg: WslConfig, values: dict[str, str]) -> WslConfig:
    """A copy of cfg with `values` set in [wsl2] (pure). Raises WslConfigError when the edit would not
    make WSL apply exactly `values` with every other setting as before."""
    for key, value in values.items():
        plain = value and value == value.strip() and not any(c in value for c in "#\"\\\r\n\x1a")
        if not plain or (key.lower() in DEFAULTS and _parsed(key.lower(), value) is None):
            raise WslConfigError(f"WSL would not read {key}={value!r} as a {key} value")
    text, edits, missing = cfg.text, [], []
    for key, value in values.items():
        found = cfg.reading.first(f"{SECTION}.{key}")
        if found is None:
            missing.append(f"{key}={value}{cfg.newline}")
        elif not _same_value(key.lower(), found.value, value):
            edits.append((*found.value_span, value))
    if missing:
        at, added = _insertion(cfg, missing)
        edits.append((at, at, added))
    # back to front, so offsets stay valid; at one offset the added lines go after a replaced value
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[0] == e[1] and "\n" in e[2]), reverse=True):
        text = text[:start] + new + text[end:]
    result = cfg.with_text(text)
    ours = {f"{SECTION}.{k}".lower(): (k.lower(), v) for k, v in values.items()}
    before, after = _settings(cfg.reading), _settings(result.reading)
    kept = all(after.get(k) == v for k, v in before.items() if k not in ours)
    applied = all(_same_value(name, after.get(k, ""), v) for k, (name, v) in ours.items())
    if not (kept and applied and set(after) == set(before) | set(ours)
            and len(result.reading.skipped) == len(cfg.reading.skipped)):
        raise WslConfigError("cannot add the values without changing how WSL reads the lines around them; "
                             "edit it by hand (`--dry-run` shows what we wanted to write)")
    return result


def diff(old: WslConfig, new: WslConfig) -> str:
    """A unified diff of the two texts, by WSL's lines (line endings not shown)."""
    return "".join(difflib.unified_diff(
        [_shown(x.rstrip("\r\n")) + "\n" for x in _lines(old.text)], [_shown(x.rstrip("\r\n")) + "\n" for x in _lines(new.text)],
        fromfile=f"{old.path} (now)", tofile=f"{new.path} (after)"))


@dataclass(frozen=True)
class ApplyResult:
    changed: bool
    diff: str
    backup: Path | None
    written: bool
    notes: tuple[str, ...] = ()  # what WSL will still skip, ignore or reject in the file after the edit


def _writable(target: Path) -> None:
    st = target.stat()
    if not st.st_mode & 0o222 or not os.access(target, os.W_OK):
        raise WslConfigError("it is read-only; make it writable (Windows: Properties, untick Read-only) and run again")


def apply(path: Path, values: dict[str, str], dry_run: bool = False) -> ApplyResult:
    """Set [wsl2] values in the file at path: backup, then atomic write. dry_run changes nothing."""
    folder = _target(Path(path)).parent
    if not folder.is_dir():  # the Windows profile folder always exists: a missing one is a typo
        raise WslConfigError(f"there is no folder {folder}; WSL reads .wslconfig from your Windows profile "
                             "folder (C:\\Users\\<you>, in WSL /mnt/c/Users/<you>): check the path")
    with contextlib.nullcontext() if dry_run else edit_lock(_target(Path(path))):
        old = load(path)
        new = with_values(old, values)
        notes = tuple(findings(new))
        if new.text == old.text:
            return ApplyResult(False, "", None, False, notes)
        text_diff = diff(old, new)
        if dry_run:
            return ApplyResult(True, text_diff, None, False, notes)
        backup = None
        if old.exists:
            _writable(old.target)
            backup = make_backup(old.path, old.to_bytes(), like=old.target.stat())
        write_atomic(old.target, new.to_bytes(), expect=old.to_bytes() if old.exists else None)
        return ApplyResult(True, text_diff, backup, True, notes)


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
    rule = (f"host RAM {host_gib:.1f} GB - {keep} GB kept for Windows, at most 75% -> memory={memory_gib}GB; "
            f"swap={swap_gib}GB; processors left at WSL's default (all)")
    return Recommendation(f"{memory_gib}GB", f"{swap_gib}GB", None, rule, warning)
