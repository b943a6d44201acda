"""What WSL reads from a .wslconfig: wsl/wslconfig_parser.py against the behaviour of microsoft/WSL's
src/shared/configfile/configfile.cpp ParseConfigFile (cited per case), the UCRT's text mode under
`_wfopen(..., "rt,ccs=UTF-8")`, and stringshared.h ParseMemorySize. No Windows host exists here, so the
cases are the source's own rules, traced by hand."""
from __future__ import annotations

import codecs

import pytest

from wsl import wslconfig_parser as parser


def applied(text: str, key: str = "wsl2.memory") -> str | None:
    found = parser.read(text).first(key)
    return None if found is None else found.value


@pytest.mark.parametrize("text, memory", [
    # '#' ends a value even without a space before it (configfile.cpp: `case '#': if (!inQuote)`)
    ("[wsl2]\nmemory=4GB#was 2GB\n", "4GB"),
    ("[wsl2]\nmemory = 4GB   # was 2GB\n", "4GB"),
    # ';' is an ordinary character: the rest of the line is the value (there is no ';' case)
    ("[wsl2]\nmemory=12GB ; was 2GB\n", "12GB ; was 2GB"),
    # quotes are removed; spaces inside them stay; '#' inside them is not a comment
    ('[wsl2]\nmemory="4GB"\n', "4GB"),
    ('[wsl2]\nmemory=" 4GB "\n', " 4GB "),
    ('[wsl2]\nmemory="4#GB"\n', "4#GB"),
    # escapes and a line continuation (configfile.cpp `case '\\'`)
    ("[wsl2]\nmemory=4\\\nGB\n", "4GB"),
    ("[wsl2]\r\nmemory=4\\\r\nGB\r\n", "4GB"),  # CRLF reads as LF first (UCRT text mode)
    # trailing spaces and tabs are trimmed (trimmedLength), but nothing else: form feed, NBSP stay
    ("[wsl2]\nmemory=4GB \t \n", "4GB"),
    ("[wsl2]\nmemory=4GB\x0c\n", "4GB\x0c"),
    ("[wsl2]\nmemory=4GB\u00a0\n", "4GB\xa0"),
    # only '\n' ends a line: U+2028 is one more character (cast to char: 0x28)
    ("[wsl2]\nmemory=4GB\u2028swap=2GB\n", "4GB(swap=2GB"),
    # a lone CR ends a value line (`while (ch != WEOF && ch != '\n' && ch != '\r')`)
    ("[wsl2]\rmemory=4GB\r", "4GB"),
    # keys and sections match case-insensitively (strcasecmp in ConfigKey::Matches), indentation is skipped
    ("[WSL2]\n\tMEMORY = 4GB\n", "4GB"),
    # a header may carry spaces and a '#' comment after ']'
    ("[wsl2]   # the VM\nmemory=4GB\n", "4GB"),
    # the FIRST of repeated keys counts, even when WSL rejects its value (ConfigKey::Parse)
    ("[wsl2]\nmemory=4GB\nmemory=6GB\n", "4GB"),
    ("[wsl2]\nmemory=lots\nmemory=6GB\n", "lots"),
    ("[wsl2]\nmemory=4GB\n[boot]\n[wsl2]\nmemory=6GB\n", "4GB"),
    # ... in a second [wsl2] block it still counts when it is the first
    ("[wsl2]\nswap=1GB\n[boot]\nsystemd=true\n[wsl2]\nmemory=6GB\n", "6GB"),
    # an invalid header keeps the previous section (sectionLength only changes on a valid one)
    ("[ wsl2 ]\nmemory=4GB\n", None),
    ("[wsl2]\n[ experimental ]\nmemory=4GB\n", "4GB"),
    ("[wsl2] ; c\nmemory=4GB\n", None),
    ("[wsl2]x\nmemory=4GB\n", None),
    ("[wsl-2]\nmemory=4GB\n", None),
    # ... and a header that fails after its name leaves that name in the key buffer, cut to the old
    # section's length (key.resize(sectionLength)): after [boot], "[wsl2 ]" makes the next key wsl2.*
    ("[boot]\nsystemd=true\n[wsl2 ]\nmemory=4GB\n", "4GB"),
    # memory in another section, or before any header, is not wsl2.memory
    ("[experimental]\nmemory=4GB\n", None),
    ("memory=4GB\n[wsl2]\n", None),
    # a comment runs to '\n' only: a lone CR does not end it (the `if (ch == '\r')` in the comment loop)
    ("[wsl2]\n# note\rmemory=4GB\n", None),
    # Ctrl+Z is the end of the file for the UCRT's text mode (read.cpp translate_text_mode_nolock)
    ("[wsl2]\nswap=1GB\x1amemory=4GB\n", None),
    # a second BOM is a character at the start of the first line: that line is skipped
    ("\ufeff[wsl2]\nmemory=4GB\n", None),
    # a line WSL skips does not take the next line with it
    ("[wsl2]\nmemory 8GB\nmemory=4GB\n", "4GB"),
    ("[wsl2]\nkernel=C:\\Users\\me\\k\nmemory=4GB\n", "4GB"),
    ('[wsl2]\nkernelCommandLine="open\nmemory=4GB\n', "4GB"),
    ("[wsl2]\nmy_key=1\nmemory=4GB\n", "4GB"),
    ("[wsl2]\n; a semicolon line\nmemory=4GB\n", "4GB"),
    ("", None),
])
def test_what_wsl_applies(text, memory):
    assert applied(text) == memory


@pytest.mark.parametrize("comment_char", ["\u2028", "\u2029", "\u0085", "\x0c", "\x1c", "\x1d", "\x1e", "\x0b"])
def test_str_splitlines_characters_do_not_end_a_comment(comment_char):
    text = f"# before{comment_char}memory=1GB\n[wsl2]\nmemory=4GB\n"
    r = parser.read(text)
    assert applied(text) == "4GB" and not r.skipped
    assert [h.name for h in r.headers] == ["wsl2"]


def test_skipped_lines_carry_their_reason():
    text = "[ wsl2 ]\n[wsl2] ; c\nmemory 8GB\nkernel=C:\\Users\n; c\n\u00e9t\u00e9=1\nk=\"open\n"
    reasons = [s.reason for s in parser.read(text).skipped]
    assert len(reasons) == 7
    assert "no spaces" in reasons[0] and "# comment may follow" in reasons[1] and "then `=`" in reasons[2]
    assert "`\\U` is not an escape" in reasons[3] and "starts with a letter" in reasons[4] == reasons[5]
    assert "not closed" in reasons[6]


def test_spans_point_at_the_value_as_written():
    text = '[wsl2]\r\nmemory = "4GB"  # was 2GB\r\nswap=1GB'
    r = parser.read(text)
    memory, swap = r.first("wsl2.memory"), r.first("wsl2.swap")
    assert text[slice(*memory.value_span)] == '"4GB"' and text[memory.end:memory.end + 4] == "swap"
    assert text[slice(*swap.value_span)] == "1GB" and swap.end == len(text)
    assert [text[h.start:h.end] for h in r.headers] == ["[wsl2]\r\n"]


@pytest.mark.parametrize("value, size", [
    ("12GB", 12 << 30), ("12G", 12 << 30), ("8192MB", 8 << 30), ("8192M", 8 << 30), ("1TB", 1 << 40),
    ("512KB", 512 << 10), ("100B", 100), ("100", 100), ("+4GB", 4 << 30), ("0", 0), ("0GB", 0),
    ("12gb", None), ("12Gb", None), ("12GiB", None), ("1.5GB", None), ("12 GB", None), ("12GBB", None),
    ("00", None), ("0x10", None), ("GB", None), ("", None), (" 12GB", 12 << 30), ("12GB ", None),
])
def test_memory_sizes_as_wsl_parses_them(value, size):
    """stringshared.h ParseMemorySize: strtoull base 10, then an exact, case-sensitive unit."""
    assert parser.parse_memory_size(value) == size


@pytest.mark.parametrize("value, number", [
    ("8", 8), ("0x10", 16), ("010", 8), ("-2", -2), ("08", None), ("0x", None), ("8 cores", None),
    ("", None), ("99999999999", 2 ** 31 - 1),
])
def test_processor_counts_as_wsl_parses_them(value, number):
    """configfile.cpp ConfigKey::ParseImpl(int&): strtol(value, &end, 0), Windows' 32-bit long."""
    assert parser.parse_int(value) == number


@pytest.mark.parametrize("data, encoding, bom", [
    (b"[wsl2]\n", "utf-8", b""),
    (codecs.BOM_UTF8 + b"[wsl2]\n", "utf-8", codecs.BOM_UTF8),
    (codecs.BOM_UTF16_LE + "[wsl2]\n".encode("utf-16-le"), "utf-16-le", codecs.BOM_UTF16_LE),
    (codecs.BOM_UTF16_LE, "utf-16-le", codecs.BOM_UTF16_LE),
])
def test_encodings_wsl_opens(data, encoding, bom):
    text, got_encoding, got_bom = parser.decode(data)
    assert (got_encoding, got_bom) == (encoding, bom) and bom + text.encode(encoding) == data


@pytest.mark.parametrize("data, message", [
    (codecs.BOM_UTF16_BE + "[wsl2]\n".encode("utf-16-be"), "big-endian, which WSL cannot open"),
    ("[wsl2]\nmemory=4GB\n".encode("utf-16-le"), "UTF-16 without a byte order mark"),
    ("[wsl2]\nmemory=4GB\n".encode("utf-16-be"), "UTF-16 without a byte order mark"),
    (b"[wsl2]\nmemory=\xe9t\xe9\n", "not UTF-8 text"),
    (codecs.BOM_UTF16_LE + b"[\x00\x00\xd8", "not UTF-16-LE text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    (b"[wsl2]\nmemory=4GB\x00\x00\x00\n", "NUL characters"),
])
def test_bytes_wsl_cannot_read_are_refused_with_the_reason(data, message):
    with pytest.raises(parser.UnreadableError, match=message):
        parser.decode(data)
