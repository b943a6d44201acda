"""`vlkit wsl config` edits: what WSL reads after the edit is what we report (issue 15's .wslconfig
cases and their siblings). Each case is checked twice: the exact bytes written, and the value WSL's
parser (the port in wsl/wslconfig_parser.py) applies from them."""
from __future__ import annotations

import codecs

import pytest

from tests.doctor_helpers import run_cli
from wsl import wslconfig
from wsl import wslconfig_parser as parser


def applied(text: str, key: str) -> str | None:
    found = parser.read(text).first(f"wsl2.{key}")
    return None if found is None else found.value


EDITS = [
    # (file before, values, file after); the WSL rule that decides it in the comment
    pytest.param("[wsl2]\nmemory=4GB#was 2GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB#was 2GB\n",
                 id="hash-comment-without-space-kept"),  # configfile.cpp: '#' ends the value
    pytest.param("[wsl2]\nmemory = \"4GB\"   # was 2GB\n", {"memory": "12GB"}, "[wsl2]\nmemory = 12GB   # was 2GB\n",
                 id="quoted-value-spacing-and-comment-kept"),
    pytest.param("[wsl2]\nmemory=12GB ; was 2GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\n",
                 id="semicolon-is-part-of-the-value"),  # no ';' case: WSL read "12GB ; was 2GB" and rejected it
    pytest.param("[ wsl2 ]\nmemory=4GB\n", {"memory": "12GB"}, "[ wsl2 ]\nmemory=4GB\n\n[wsl2]\nmemory=12GB\n",
                 id="spaced-header-is-not-wsl2"),  # ParseSection: isalpha after '['
    pytest.param("[wsl2] ; vm\nmemory=4GB\n", {"memory": "12GB"}, "[wsl2] ; vm\nmemory=4GB\n\n[wsl2]\nmemory=12GB\n",
                 id="header-with-semicolon-is-skipped"),
    pytest.param("[wsl2]\nmemory=4GB\nmemory=6GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\nmemory=6GB\n",
                 id="duplicate-first-one-is-edited"),  # ConfigKey::Parse keeps the first
    pytest.param("[wsl2]\nmemory=lots\nmemory=12GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\nmemory=12GB\n",
                 id="duplicate-first-invalid-blocks-the-second"),
    pytest.param("[experimental]\nmemory=4GB\n", {"memory": "12GB"}, "[experimental]\nmemory=4GB\n\n[wsl2]\nmemory=12GB\n",
                 id="memory-in-another-section-is-not-wsl2"),
    pytest.param("memory=4GB\n[wsl2]\nswap=1GB\n", {"memory": "12GB"}, "memory=4GB\n[wsl2]\nswap=1GB\nmemory=12GB\n",
                 id="memory-before-any-header-is-not-wsl2"),
    pytest.param("[WSL2]\nMemory=4gb\n", {"memory": "12GB"}, "[WSL2]\nMemory=12GB\n",
                 id="lowercase-unit-is-rejected-so-rewritten"),  # ParseMemorySize is case-sensitive
    pytest.param("[wsl2]\nmemory=12288MB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12288MB\n",
                 id="same-size-other-unit-unchanged"),
    pytest.param("[wsl2]\nmemory=\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\n", id="empty-value"),
    pytest.param("[wsl2]\nmemory=4GB   \n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB   \n", id="trailing-spaces-kept"),
    pytest.param("[wsl2]\nmemory=4\\\nGB\nswap=1GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\nswap=1GB\n",
                 id="line-continuation-is-one-value"),
    pytest.param("[wsl2]\r\nswap=1GB\nlocalhostForwarding=true\r\n[boot]\r\n", {"memory": "12GB"},
                 "[wsl2]\r\nswap=1GB\nlocalhostForwarding=true\r\nmemory=12GB\r\n[boot]\r\n",
                 id="mixed-newlines-dominant-one-used"),
    pytest.param("# a\u2028b\u2029c\u0085d\x0ce\x1cf\n[wsl2]\nmemory=4GB\n", {"memory": "12GB"},
                 "# a\u2028b\u2029c\u0085d\x0ce\x1cf\n[wsl2]\nmemory=12GB\n", id="unicode-line-separators-in-comment"),
    pytest.param("[wsl2]\n# note\rmemory=4GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\n# note\rmemory=4GB\n",
                 id="lone-cr-does-not-end-a-comment"),
    pytest.param("[wsl2]  # vm\r", {"memory": "12GB"}, "[wsl2]  # vm\r\r\nmemory=12GB\r\n",
                 id="comment-ending-in-lone-cr-gets-a-line-end"),
    pytest.param("[wsl2]\nswap=1GB\n\x1amemory=4GB\n", {"memory": "12GB"}, "[wsl2]\nswap=1GB\nmemory=12GB\n\x1amemory=4GB\n",
                 id="ctrl-z-ends-what-wsl-reads"),
    pytest.param("[boot]\nsystemd=true\n\x1a[wsl2]\n", {"memory": "12GB"},
                 "[boot]\nsystemd=true\n\n[wsl2]\nmemory=12GB\n\x1a[wsl2]\n", id="new-section-before-ctrl-z"),
    pytest.param("", {"memory": "12GB", "swap": "8GB"}, "[wsl2]\r\nmemory=12GB\r\nswap=8GB\r\n", id="empty-file"),
    pytest.param("# only a comment", {"memory": "12GB"}, "# only a comment\r\n\r\n[wsl2]\r\nmemory=12GB\r\n",
                 id="comment-without-newline"),
    pytest.param("[wsl2]", {"memory": "12GB"}, "[wsl2]\r\nmemory=12GB\r\n", id="header-without-newline"),
    pytest.param("[wsl2]\n; keep\nprocessors=0x4\n", {"processors": "4", "swap": "8GB"},
                 "[wsl2]\n; keep\nprocessors=0x4\nswap=8GB\n", id="processors-hex-equals-decimal"),  # strtol base 0
    pytest.param("[wsl2]\nmemory 8GB\n", {"memory": "12GB"}, "[wsl2]\nmemory=12GB\nmemory 8GB\n",
                 id="skipped-line-kept-value-added"),
    pytest.param("[wsl2]\nkernel=C:\\Users\\k\nswap=1GB\n", {"swap": "8GB"}, "[wsl2]\nkernel=C:\\Users\\k\nswap=8GB\n",
                 id="invalid-escape-line-untouched"),
    pytest.param("[boot]\nsystemd=true\n[wsl2 ]\nmemory=4GB\n", {"memory": "12GB"},
                 "[boot]\nsystemd=true\n[wsl2 ]\nmemory=12GB\n", id="truncated-header-quirk"),  # key.resize(sectionLength)
]


@pytest.mark.parametrize("before, values, after", EDITS)
def test_edit_is_what_wsl_reads(tmp_path, before, values, after):
    path = tmp_path / ".wslconfig"
    path.write_bytes(before.encode())
    result = wslconfig.apply(path, values)
    assert path.read_bytes() == after.encode()
    assert result.changed == (before != after) and (result.backup is not None) == (before != after)
    for key, value in values.items():
        assert wslconfig._same_value(key, applied(after, key), value)  # WSL applies what we report


@pytest.mark.parametrize("encoding, bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-8", codecs.BOM_UTF8)])
@pytest.mark.parametrize("before, values, after", [e for e in EDITS if e.id in (
    "hash-comment-without-space-kept", "spaced-header-is-not-wsl2", "mixed-newlines-dominant-one-used",
    "unicode-line-separators-in-comment", "ctrl-z-ends-what-wsl-reads")])
def test_edits_are_the_same_in_every_encoding_wsl_reads(tmp_path, encoding, bom, before, values, after):
    path = tmp_path / ".wslconfig"
    path.write_bytes(bom + before.encode(encoding))
    wslconfig.apply(path, values)
    assert path.read_bytes() == bom + after.encode(encoding)


def test_refuses_when_the_edit_would_change_other_lines(tmp_path):
    # `x=a\` at the end is skipped (an escape of EOF); any new line after it would join it (continuation)
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[boot]\nkernelCommandLine=a\\")
    with pytest.raises(wslconfig.WslConfigError, match="without changing how WSL reads"):
        wslconfig.apply(path, {"memory": "12GB"})
    assert path.read_bytes() == b"[boot]\nkernelCommandLine=a\\"


@pytest.mark.parametrize("value", ["12gb", "1.5GB", "4GB # x", '"4GB"', "12GB\n"])
def test_values_wsl_would_reject_are_not_written(tmp_path, value):
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\nmemory=4GB\n")
    with pytest.raises(wslconfig.WslConfigError, match="WSL would not read"):
        wslconfig.apply(path, {"memory": value})
    assert path.read_bytes() == b"[wsl2]\nmemory=4GB\n"


@pytest.mark.parametrize("before, note", [
    ("[ wsl2 ]\nmemory=4GB\n", "line 1: WSL skips `[ wsl2 ]`: a section header is `[name]`"),
    ("[wsl2]\nswap=12GB ; was 2GB\n", "line 2: WSL rejects swap='12GB ; was 2GB'"),
    ("[wsl2]\n; semicolon\n", "`;` does not start a comment"),
    ("[wsl2]\nmemory=4GB\nmemory=6GB\n", "line 3: a second `memory` in [wsl2]: WSL keeps the first (line 2)"),
    ("[boot]\nprocessors=4\n", "line 2: `processors` is [boot]; WSL reads it only from [wsl2]"),
    ("[wsl2]\nprocessors=four\n", "WSL rejects processors='four' and uses its default (all logical processors)"),
    ("[wsl2]\n\x1aswap=1GB\n", "line 2: WSL stops reading at a Ctrl+Z"),
    ("[wsl2]\n\x0c\u2028x\n", "WSL skips `\\x0c\\u2028x`"),  # invisible characters shown as escapes
])
def test_findings_name_the_line_and_what_wsl_does(tmp_path, before, note):
    path = tmp_path / ".wslconfig"
    path.write_bytes(before.encode())
    assert any(note in n for n in wslconfig.findings(wslconfig.load(path))), wslconfig.findings(wslconfig.load(path))


def test_cli_reports_what_wsl_will_still_skip(tmp_path, capsys):
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[ wsl2 ]\nmemory=4GB\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--swap", "8GB", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "note: line 1: WSL skips `[ wsl2 ]`" in out and "`memory` is before any [section]" in out
    assert "+[wsl2]" in out and "Wrote" in out
    assert applied(path.read_text(), "memory") == "12GB" and applied(path.read_text(), "swap") == "8GB"


@pytest.mark.parametrize("args, message", [
    (["--memory", "12gb"], "upper-case units: 12GB"),
    (["--memory", "-1"], "not a size to give WSL"),
    (["--swap", "+8GB"], "not a size to give WSL"),
    (["--memory", "99999999999TB"], "not a size to give WSL"),
    (["--memory", "1.5GB"], "not a size WSL reads"),
    (["--memory", "12"], "12 bytes, under WSL's 256MB minimum (to WSL a number without a unit is bytes"),
    (["--memory", "100MB"], "under WSL's 256MB minimum"),
    (["--swap", "8 GB"], "--swap: not a size WSL reads"),
])
def test_cli_refuses_sizes_wsl_would_misread(tmp_path, capsys, args, message):
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\nmemory=4GB\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--swap", "8GB", *args, "--yes"]) == 1
    assert message in capsys.readouterr().err
    assert path.read_bytes() == b"[wsl2]\nmemory=4GB\n"


def _windows_host_with(tmp_path, monkeypatch, ram_gib: int) -> None:
    """The Windows host's RAM as the doctor cached it from Win32_ComputerSystem (this machine has no Windows)."""
    import json
    import time

    cache = tmp_path / "xdg" / "vlkit"
    cache.mkdir(parents=True)
    (cache / "windows-host.json").write_text(json.dumps({"host_ram_bytes": {"at": time.time(), "value": ram_gib * 2**30}}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.mark.parametrize("memory", ["64GB", "1TB"])
def test_memory_beyond_the_pcs_ram_is_refused(tmp_path, monkeypatch, capsys, memory):
    """WSL caps memory at the host's RAM, so 64GB on a 32 GB PC gives the VM all of it: refused."""
    _windows_host_with(tmp_path, monkeypatch, 32)
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\nmemory=4GB\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", memory, "--swap", "8GB", "--yes"]) == 1
    assert "more than this PC's 32 GB of RAM" in capsys.readouterr().err
    assert path.read_bytes() == b"[wsl2]\nmemory=4GB\n"


def test_one_value_given_keeps_the_others_the_file_sets(tmp_path, monkeypatch):
    """--memory alone changes memory: the user's own swap=0 (with its comment) stays."""
    _windows_host_with(tmp_path, monkeypatch, 32)
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\r\nmemory=4GB\r\nswap=0 # no swap on my SSD\r\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--yes"]) == 0
    assert path.read_bytes() == b"[wsl2]\r\nmemory=12GB\r\nswap=0 # no swap on my SSD\r\n"
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--yes"]) == 0  # nothing given: the recommendation
    assert applied(path.read_text(), "memory") == "24GB" and applied(path.read_text(), "swap") == "8GB"


def test_ctrl_d_at_the_question_changes_nothing(tmp_path, monkeypatch, capsys):
    _windows_host_with(tmp_path, monkeypatch, 32)
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\nmemory=4GB\n")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)

    def ctrl_d(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", ctrl_d)
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--swap", "8GB"]) == 0
    assert "Nothing changed." in capsys.readouterr().out and path.read_bytes() == b"[wsl2]\nmemory=4GB\n"


@pytest.mark.parametrize(("before", "flags"), [("memory=64GB", ["--swap", "8GB"]), ("memory=-1", ["--processors", "4"])])
def test_a_value_the_file_has_that_nobody_means_is_not_kept(tmp_path, monkeypatch, before, flags):
    """Editing swap or processors keeps the file's memory, but not one above the PC's RAM or one WSL
    reads as all of it: the recommendation takes its place (the user did not type it, so it is no error)."""
    _windows_host_with(tmp_path, monkeypatch, 32)
    path = tmp_path / ".wslconfig"
    path.write_bytes(f"[wsl2]\n{before}\n".encode())
    assert run_cli(["wsl", "config", "--wslconfig", str(path), *flags, "--yes"]) == 0
    assert applied(path.read_text(), "memory") == "24GB"
