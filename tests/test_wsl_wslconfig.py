""".wslconfig editing: encodings, untouched bytes, backup, atomic write, idempotence, dry run."""
from __future__ import annotations

import codecs
import os
import subprocess
import sys

import pytest

from tests.doctor_helpers import run_cli
from wsl import wslconfig

# A file as a user keeps it: comments, an unknown section, odd key case, an inline comment.
USER_FILE = [
    "# WSL settings - edited by hand",
    "[wsl2]",
    "Memory = 6GB  # was 4GB",
    "; keep localhost forwarding",
    "localhostForwarding=true",
    "kernelCommandLine = vsyscall=emulate",
    "",
    "[experimental]",
    "autoMemoryReclaim=gradual",
    "sparseVhd=true",
]


def write(path, lines, encoding="utf-8", bom=b"", newline="\n"):
    data = bom + (newline.join(lines) + newline).encode(encoding)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("encoding, bom, newline", [
    ("utf-16-le", codecs.BOM_UTF16_LE, "\r\n"),  # Notepad's "Unicode"
    ("utf-8", codecs.BOM_UTF8, "\r\n"),
    ("utf-8", b"", "\n"),
    ("utf-8", b"", "\r\n"),
])
def test_edit_keeps_encoding_newlines_and_untouched_lines(tmp_path, encoding, bom, newline):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE, encoding, bom, newline)
    result = wslconfig.apply(path, {"memory": "12GB", "swap": "8GB"})
    assert result.changed and result.written
    after = path.read_bytes()
    assert after.startswith(bom) and (bom or not after.startswith(codecs.BOM_UTF8))
    lines = after[len(bom):].decode(encoding).split(newline)
    expected = list(USER_FILE)
    expected[2] = "Memory = 12GB  # was 4GB"  # key spelling, spacing and comment kept
    expected.insert(6, "swap=8GB")  # after the section's last key, before the blank line
    assert lines == expected + [""]
    # every untouched line is byte-identical: compare the encoded lines themselves
    old_lines = before[len(bom):].split(newline.encode(encoding))
    new_lines = after[len(bom):].split(newline.encode(encoding))
    assert [l for l in old_lines if l not in new_lines] == [old_lines[2]]
    assert result.backup.read_bytes() == before
    assert result.backup.name.startswith(".wslconfig.vlkit-") and result.backup.name.endswith(".bak")


def test_running_twice_changes_nothing(tmp_path):
    path = tmp_path / ".wslconfig"
    write(path, USER_FILE, "utf-16-le", codecs.BOM_UTF16_LE, "\r\n")
    wslconfig.apply(path, {"memory": "12GB", "swap": "8GB"})
    once = path.read_bytes()
    again = wslconfig.apply(path, {"memory": "12gb", "swap": "8192MB"})  # same sizes, other spelling
    assert not again.changed and again.backup is None
    assert path.read_bytes() == once
    assert len(list(tmp_path.glob("*.bak"))) == 1


def test_dry_run_shows_a_diff_and_writes_nothing(tmp_path):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)
    result = wslconfig.apply(path, {"memory": "12GB", "processors": "8"}, dry_run=True)
    assert result.changed and not result.written and result.backup is None
    assert "-Memory = 6GB  # was 4GB" in result.diff and "+Memory = 12GB  # was 4GB" in result.diff
    assert "+processors=8" in result.diff
    assert path.read_bytes() == before and os.listdir(tmp_path) == [".wslconfig"]


def test_missing_section_and_missing_file(tmp_path):
    path = tmp_path / ".wslconfig"
    write(path, ["[boot]", "systemd=true"])
    wslconfig.apply(path, {"memory": "8GB"})
    assert path.read_text() == "[boot]\nsystemd=true\n\n[wsl2]\nmemory=8GB\n"
    new = tmp_path / "profile" / ".wslconfig"
    result = wslconfig.apply(new, {"memory": "8GB", "swap": "4GB"})
    assert result.backup is None and new.read_bytes() == b"[wsl2]\r\nmemory=8GB\r\nswap=4GB\r\n"


def test_last_line_without_newline(tmp_path):
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\r\nmemory=4GB")
    wslconfig.apply(path, {"memory": "4GB", "swap": "2GB"})
    assert path.read_bytes() == b"[wsl2]\r\nmemory=4GB\r\nswap=2GB\r\n"


@pytest.mark.parametrize("data, message", [
    (b"[wsl2]\nmemory 12GB\n", "line 2"),  # no '='
    (b"\xff\xfe[\x00w\x00s\x00l\x002\x00]\x00\n\x00\x00\xd8", "not UTF-8 or UTF-16"),  # broken UTF-16
    (b"[wsl2]\nmemory=\xe9t\xe9\n", "not UTF-8 or UTF-16"),  # Latin-1, not UTF-8
])
def test_unparseable_file_is_left_untouched(tmp_path, data, message):
    path = tmp_path / ".wslconfig"
    path.write_bytes(data)
    with pytest.raises(wslconfig.WslConfigError, match=message):
        wslconfig.apply(path, {"memory": "12GB"})
    assert path.read_bytes() == data and os.listdir(tmp_path) == [".wslconfig"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wslconfig.os, "replace", broken_replace)
    with pytest.raises(OSError):
        wslconfig.apply(path, {"memory": "12GB"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # temp file cleaned up


def test_get_reads_last_value_case_insensitively(tmp_path):
    path = tmp_path / ".wslconfig"
    write(path, ["[WSL2]", "MEMORY=4GB", "memory=6GB # later wins", "[other]", "memory=1GB"])
    cfg = wslconfig.load(path)
    assert wslconfig.get(cfg, "memory") == "6GB"
    assert wslconfig.get(cfg, "swap") is None


def test_sizes():
    assert wslconfig.parse_size("12GB") == 12 * 1024 ** 3
    assert wslconfig.parse_size("8192MB") == 8 * 1024 ** 3
    assert wslconfig.format_size(12 * 1024 ** 3) == "12GB"
    with pytest.raises(ValueError):
        wslconfig.parse_size("lots")


@pytest.mark.parametrize("host_gib, profile, memory, swap, warned", [
    (16, "8gb", "12GB", "8GB", False),   # 16 GB laptop: Windows keeps 4 GB
    (32, "16gb", "24GB", "8GB", False),  # keeps 8 GB
    (64, "16gb", "48GB", "8GB", False),  # at most 75%
    (8, "8gb", "6GB", "4GB", True),      # too small for the profile: said so
])
def test_recommendation_rule(host_gib, profile, memory, swap, warned):
    rec = wslconfig.recommend(host_gib * 1024 ** 3, profile)
    assert (rec.memory, rec.swap, rec.processors, rec.warning is not None) == (memory, swap, None, warned)


def test_cli_config_yes_then_noop(tmp_path, capsys):
    path = tmp_path / ".wslconfig"
    write(path, USER_FILE, "utf-16-le", codecs.BOM_UTF16_LE, "\r\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--swap", "8GB", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "Backup:" in out and "wsl-restart" in out
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--swap", "8GB", "--yes"]) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.bak"))) == 1


def test_cli_config_refuses_without_tty_or_yes(tmp_path):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)
    code = ("import sys; from tests.doctor_helpers import run_cli; "
            f"sys.exit(run_cli(['wsl', 'config', '--wslconfig', {str(path)!r}, '--memory', '12GB', '--swap', '8GB']))")
    proc = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 1
    assert "--yes" in proc.stderr and "+Memory = 12GB" in proc.stdout  # shows what it would do
    assert path.read_bytes() == before


def test_cli_config_bad_values_and_bad_file(tmp_path, capsys):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "twelve", "--swap", "8GB", "--yes"]) == 1
    assert "not a size" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.write_bytes(b"[wsl2]\nthis is not ini\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(bad), "--memory", "8GB", "--swap", "4GB", "--yes"]) == 1
    assert "was not changed" in capsys.readouterr().err
    assert path.read_bytes() == before and bad.read_bytes() == b"[wsl2]\nthis is not ini\n"


def test_cli_dry_run(tmp_path, capsys):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "10GB", "--swap", "4GB",
                    "--processors", "6", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+processors=6" in out and "Dry run" in out
    assert path.read_bytes() == before
