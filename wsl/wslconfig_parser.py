"""What WSL reads from a `.wslconfig`: a port of WSL's own parser, character for character.

Followed (microsoft/WSL at 3e27a6a5):
- src/windows/common/WslCoreConfig.cpp, `wsl::core::Config::ParseConfigFile`: the file is opened with
  `_wfopen(path, L"rt,ccs=UTF-8")` and parsed with CFG_SKIP_INVALID_LINES | CFG_SKIP_UNKNOWN_VALUES.
- src/shared/configfile/configfile.cpp, `ParseConfigFile` (the state machine ported in `read`) and
  `ConfigKey::Parse` (a repeated key is ignored: the FIRST one counts, even when its value is invalid).
- src/shared/inc/stringshared.h, `ParseMemorySize` (memory, swap); `ConfigKey::ParseImpl(int&)`
  (processors: `strtol(value, &end, 0)`).
- The UCRT under `_wfopen` (lowio/open.cpp `configure_text_mode`, lowio/read.cpp
  `translate_text_mode_nolock`): a UTF-8 BOM or UTF-16 LE BOM picks the encoding, a UTF-16 BE BOM makes
  the open fail, anything else is UTF-8; CRLF reads as LF, a lone CR stays a CR, Ctrl+Z ends the file.

So, unlike an INI library: only `\\n` ends a line (never U+2028, form feed, ...), only `#` starts a
comment (also right after a value: `4GB#x` is 4GB), `;` is an ordinary character, a header is exactly
`[letters-and-digits]`, a key is letters and digits, and a line WSL cannot parse is skipped.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass

WEOF = "\uffff"  # fgetwc's WEOF; a U+FFFF in the file compares equal to it, as in C
_HSPACE = " \t"  # configfile.cpp IsHSpace
_C_SPACE = " \t\n\v\f\r"  # isspace() in the "C" locale, which strtoull/strtol skip
_SIZE_UNITS = (("B", 1), ("KB", 1 << 10), ("MB", 1 << 20), ("GB", 1 << 30), ("TB", 1 << 40))
U64 = 1 << 64
_HEX_DIGITS = "0123456789abcdefABCDEF"


class UnreadableError(Exception):
    """The bytes are not a file WSL can read as text (the message says what WSL does instead)."""


def decode(data: bytes) -> tuple[str, str, bytes]:
    """bytes -> (text, codec, bom) the way `_wfopen(..., "rt,ccs=UTF-8")` picks the encoding."""
    if data.startswith(codecs.BOM_UTF16_BE):
        raise UnreadableError("it is UTF-16 big-endian, which WSL cannot open (it then uses its defaults "
                              "for everything); save it from Notepad as UTF-8")
    if data.startswith(codecs.BOM_UTF16_LE):
        bom, encoding = codecs.BOM_UTF16_LE, "utf-16-le"
    elif data.startswith(codecs.BOM_UTF8):
        bom, encoding = codecs.BOM_UTF8, "utf-8"
    else:
        bom, encoding = b"", "utf-8"
    try:
        text = data[len(bom):].decode(encoding)
    except UnicodeDecodeError as exc:
        raise UnreadableError(f"it is not {encoding.upper()} text ({exc.reason} at byte {exc.start + len(bom)}), "
                              "which is what WSL reads; save it from Notepad as UTF-8") from None
    if "\x00" in text:
        if not bom and len(data) > 1 and (data[1:2] == b"\x00") != (data[0:1] == b"\x00"):
            raise UnreadableError("it is UTF-16 without a byte order mark: WSL reads it as UTF-8 and finds no "
                                  "settings in it; save it from Notepad as UTF-8")
        raise UnreadableError("it contains NUL characters: not a text file")
    return text, encoding, bom


@dataclass(frozen=True)
class Assignment:
    """One `key = value` WSL hands to its key table."""
    key: str  # as WSL matches it (case-insensitively): "wsl2.memory", or "memory" before any header
    value: str  # exactly what WSL passes to the key's parser (quotes and escapes resolved)
    start: int  # text offset of the key's first letter
    value_span: tuple[int, int]  # the value as written: first character after `=` and spaces .. last non-space
    end: int  # where WSL starts reading the next line

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0].lower()

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2].lower()


@dataclass(frozen=True)
class Header:
    name: str  # lower-cased
    start: int
    end: int


@dataclass(frozen=True)
class Skipped:
    """A line WSL skips with a warning."""
    start: int
    reason: str


@dataclass(frozen=True)
class Reading:
    text: str
    assignments: tuple[Assignment, ...]
    headers: tuple[Header, ...]
    skipped: tuple[Skipped, ...]
    end: int  # where WSL stopped reading: len(text), or the offset of a Ctrl+Z

    def first(self, key: str) -> Assignment | None:
        """The assignment WSL applies for `key` ("wsl2.memory"): the first one (ConfigKey::Parse)."""
        return next((a for a in self.assignments if a.key.lower() == key.lower()), None)


class _Stream:
    """fgetwc/ungetwc/feof over the decoded text after the UCRT's text-mode translation."""

    def __init__(self, text: str):
        self.text = text
        stop = text.find("\x1a")  # translate_text_mode_nolock: Ctrl+Z is the end of a file
        self.limit = len(text) if stop < 0 else stop
        self.pos = 0
        self.last = 0  # offset of the character getc returned last
        self.eof = False

    def getc(self) -> str:
        self.last = self.pos
        if self.pos >= self.limit:
            self.eof = True
            return WEOF
        ch = self.text[self.pos]
        if ch == "\r" and self.pos + 1 < self.limit and self.text[self.pos + 1] == "\n":
            self.pos += 2  # CRLF => LF
            return "\n"
        self.pos += 1
        return ch

    def ungetc(self, ch: str) -> None:
        if ch != WEOF:  # ungetwc(WEOF) fails and leaves the stream as it is
            self.pos = self.last


def _alpha(ch: str) -> bool:  # isalpha()/isalnum() in the "C" locale: ASCII only
    return ch.isascii() and ch.isalpha()


def _alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _narrow(ch: str) -> str:
    """`static_cast<char>(ch)` on each UTF-16 unit: what a non-ASCII character becomes in a value."""
    units = ch.encode("utf-16-le", "surrogatepass")
    return "".join(chr(units[i]) for i in range(0, len(units), 2))


def _c_string(s: str) -> str:
    return s.split("\x00", 1)[0]


def read(text: str) -> Reading:
    """Run configfile.cpp's ParseConfigFile (parse mode, invalid lines skipped) over `text`."""
    s = _Stream(text)
    ch = "\x00"
    key = "\x00"  # `std::string key = {0}`: one NUL, later cut or padded by resize()
    section_length = 0
    assignments: list[Assignment] = []
    headers: list[Header] = []
    skipped: list[Skipped] = []
    pending = None  # an item whose end is known only once its line (or trailing comment) is consumed
    state, start = "newline", 0
    while True:
        if state == "newline":
            if ch == "#":  # skip a comment: to '\n' only (a CR followed by something else does not end it)
                while True:
                    ch = s.getc()
                    if ch == "\r":
                        ch = s.getc()
                    if ch in ("\n", WEOF):
                        break
            if pending is not None:
                kind, fields = pending
                (headers if kind is Header else assignments).append(kind(**fields, end=s.pos))
                pending = None
            if s.eof:
                return Reading(text, tuple(assignments), tuple(headers), tuple(skipped), s.limit)
            ch = s.getc()
            while ch in _HSPACE:
                ch = s.getc()
            start = s.last
            if ch == "\r":
                nxt = s.getc()
                if nxt != "\n":
                    s.ungetc(nxt)
            elif ch in (WEOF, "\n", "#"):
                pass
            elif ch == "[":
                state = "section"
            elif not _alpha(ch):
                state, reason = "invalid", "a line starts with a letter (a key), `[` or `#`"
            else:
                state = "key"
        elif state == "section":
            ch = s.getc()
            state, reason = "invalid", "a section header is `[name]`: a letter, then letters and digits, no spaces"
            if not _alpha(ch):
                continue
            key = ""
            while True:
                key += ch
                ch = s.getc()
                if not _alnum(ch):
                    break
            if ch != "]":
                continue
            ch = s.getc()
            while ch in _HSPACE:
                ch = s.getc()
            if ch not in (WEOF, "\n", "\r", "#"):
                reason = "only spaces and a # comment may follow `]`"
                continue
            section_length = len(key)
            pending = (Header, dict(name=key.lower(), start=start))
            state = "newline"
        elif state == "key":
            key = key[:section_length].ljust(section_length, "\x00")  # std::string::resize
            if key:
                key += "."
            while True:
                key += ch
                ch = s.getc()
                if not _alnum(ch):
                    break
            while ch in _HSPACE:
                ch = s.getc()
            if ch != "=":
                state, reason = "invalid", "a key is letters and digits, then `=`"
                continue
            ch = s.getc()
            while ch in _HSPACE:
                ch = s.getc()
            value, trimmed, in_quote = "", 0, False
            value_start = value_end = s.last
            state = "newline"
            while ch not in (WEOF, "\n", "\r"):
                if ch == '"':
                    in_quote = not in_quote
                elif ch == "\\":
                    ch2 = s.getc()
                    if ch2 in ("\\", '"'):
                        value += ch2
                    elif ch2 in ("b", "n", "t"):
                        value += {"b": "\b", "n": "\n", "t": "\t"}[ch2]
                    elif ch2 not in ("\r", "\n"):  # "\\\n" is a line continuation
                        state, reason = "invalid", f"`\\{ch2 if ch2 != WEOF else ''}` is not an escape WSL knows (write `\\\\` for a backslash)"
                        break
                elif ch == "#" and not in_quote:
                    break
                else:
                    value += _narrow(ch)
                if ch not in _HSPACE:
                    trimmed, value_end = len(value), s.pos
                ch = s.getc()
            if state == "invalid":
                continue
            if in_quote:
                state, reason = "invalid", 'a quote `"` is not closed on its line'
                continue
            pending = (Assignment, dict(key=_c_string(key), value=_c_string(value[:trimmed]), start=start,
                                        value_span=(value_start, value_end)))
        else:  # "invalid": skip the rest of the line (CFG_SKIP_INVALID_LINES)
            skipped.append(Skipped(start, reason))
            while ch not in (WEOF, "\n"):
                ch = s.getc()
            state = "newline"


# --------------------------------------------------------------------------- value parsers

def _strtou(text: str, base: int) -> tuple[int, bool, int]:
    """The part strtoull/strtol share: (magnitude, negative, end index; 0 when nothing was converted)."""
    i = 0
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    negative = i < len(text) and text[i] == "-"
    if i < len(text) and text[i] in "+-":
        i += 1
    if base == 0:
        if text[i:i + 2] in ("0x", "0X") and text[i + 2:i + 3] and text[i + 2] in _HEX_DIGITS:
            base, i = 16, i + 2
        else:
            base = 8 if text[i:i + 1] == "0" else 10
    digits = _HEX_DIGITS[:base] + _HEX_DIGITS[16:16 + max(0, base - 10)]
    j = i
    while j < len(text) and text[j] in digits:
        j += 1
    if j == i:
        return 0, False, 0
    return int(text[i:j], base), negative, j


def parse_memory_size(value: str) -> int | None:
    """stringshared.h ParseMemorySize: digits, then nothing (bytes) or exactly B, K, KB, M, MB, G, GB, T
    or TB, upper-case; None when WSL rejects it (it then keeps its default)."""
    magnitude, negative, end = _strtou(value, 10)
    number = U64 - 1 if magnitude >= U64 else (-magnitude % U64 if negative else magnitude)
    if number == 0 and (not value.startswith("0") or end != 1):
        return None
    rest = value[end:]
    if not rest:
        return number
    for suffix, factor in _SIZE_UNITS:
        if rest in (suffix, suffix[0]):
            return number * factor % U64
    return None


def parse_int(value: str) -> int | None:
    """ConfigKey::ParseImpl(int&): strtol(value, &end, 0) with Windows' 32-bit long; None when rejected."""
    magnitude, negative, end = _strtou(value, 0)
    number = max(-(1 << 31), min((1 << 31) - 1, -magnitude if negative else magnitude))
    if not value or end != len(value):
        return None
    return number
