""".wslconfig editing: encodings, untouched bytes, backup, atomic write, idempotence, dry run."""
from __future__ import annotations

import codecs
import os
import stat
import subprocess
import sys
import threading
import time

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
    again = wslconfig.apply(path, {"memory": "12288MB", "swap": "8192M"})  # same sizes to WSL, other spelling
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
    (tmp_path / "profile").mkdir()
    new = tmp_path / "profile" / ".wslconfig"
    result = wslconfig.apply(new, {"memory": "8GB", "swap": "4GB"})
    assert result.backup is None and new.read_bytes() == b"[wsl2]\r\nmemory=8GB\r\nswap=4GB\r\n"


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_folder_that_is_not_there_is_a_typo_not_created(tmp_path, dry_run):
    """--wslconfig /mnt/c/Users/Jhon/.wslconfig: WSL never reads a file in a folder we would make up."""
    typo = tmp_path / "Jhon" / ".wslconfig"
    with pytest.raises(wslconfig.WslConfigError, match=f"there is no folder {typo.parent}"):
        wslconfig.apply(typo, {"memory": "8GB"}, dry_run=dry_run)
    assert not typo.parent.exists()


def test_last_line_without_newline(tmp_path):
    path = tmp_path / ".wslconfig"
    path.write_bytes(b"[wsl2]\r\nmemory=4GB")
    wslconfig.apply(path, {"memory": "4GB", "swap": "2GB"})
    assert path.read_bytes() == b"[wsl2]\r\nmemory=4GB\r\nswap=2GB\r\n"


@pytest.mark.parametrize("data, message", [
    (codecs.BOM_UTF16_BE + "[wsl2]\nmemory=4GB\n".encode("utf-16-be"), "WSL cannot open"),
    ("[wsl2]\nmemory=4GB\n".encode("utf-16-le"), "without a byte order mark"),
    (b"\xff\xfe[\x00w\x00s\x00l\x002\x00]\x00\n\x00\x00\xd8", "not UTF-16-LE text"),  # broken UTF-16
    (b"[wsl2]\nmemory=\xe9t\xe9\n", "not UTF-8 text"),  # Latin-1, not UTF-8
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not UTF-8 text"),  # not a text file
    (b"[wsl2]\nmemory=4GB\n\x00\x00", "NUL characters"),
    (b"# " + b"x" * wslconfig.MAX_BYTES + b"\n", "not a .wslconfig"),
])
def test_unreadable_file_is_left_untouched(tmp_path, data, message):
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


def test_get_reads_the_first_value_case_insensitively(tmp_path):
    """ConfigKey::Parse (configfile.cpp): a repeated key is ignored with a warning; the first one counts."""
    path = tmp_path / ".wslconfig"
    write(path, ["[WSL2]", "MEMORY=4GB", "memory=6GB # ignored by WSL", "[other]", "memory=1GB"])
    cfg = wslconfig.load(path)
    assert wslconfig.get(cfg, "memory") == "4GB"
    assert wslconfig.get(cfg, "swap") is None
    assert any("a second `memory`" in n and "line 2" in n for n in wslconfig.findings(cfg))


def test_sizes():
    assert wslconfig.parse_size("12GB") == 12 * 1024 ** 3
    assert wslconfig.parse_size("8192MB") == 8 * 1024 ** 3
    for bad in ("lots", "12gb", "1.5GB", "12 GB", "12GiB"):
        with pytest.raises(ValueError, match="not a size WSL reads"):
            wslconfig.parse_size(bad)
    for typed, why in (("12gb", "WSL reads upper-case units: 12GB"), ("12 GB", "WSL reads no spaces: 12GB"),
                       ("12GiB", "GB, not GiB: its GB is 1024^3 already: 12GB")):
        with pytest.raises(ValueError, match=why.replace("^", "\\^")):
            wslconfig.parse_size(typed)


@pytest.mark.parametrize("typed", ["-1", "+12GB", "99999999999TB", "18446744073709551616"])
def test_sizes_wsl_reads_but_nobody_means_are_not_written(typed):
    """WSL reads -1 as 2^64-1 bytes and wraps past 2^64 (the VM then takes all of the PC's RAM):
    the values we write are digits and a unit that stay below it."""
    with pytest.raises(ValueError):
        wslconfig.parse_size_to_write(typed)
    assert wslconfig.parse_size_to_write("12GB") == 12 * 1024 ** 3


@pytest.mark.parametrize("host_gib, profile, memory, swap, warned", [
    (16, "8gb", "12GB", "8GB", False),   # 16 GB laptop: Windows keeps 4 GB
    (32, "16gb", "24GB", "8GB", False),  # keeps 8 GB
    (64, "16gb", "48GB", "8GB", False),  # at most 75%
    (8, "8gb", "6GB", "4GB", True),      # too small for the profile: said so
])
def test_recommendation_rule(host_gib, profile, memory, swap, warned):
    rec = wslconfig.recommend(host_gib * 1024 ** 3, profile)
    assert (rec.memory, rec.swap, rec.processors, rec.warning is not None) == (memory, swap, None, warned)


def test_the_rule_shows_the_sum_it_made():
    """Windows reports a 32 GB PC as a little less (hardware-reserved memory): the rule must show the
    RAM it subtracted from, not '32 GB - 8 GB -> 23GB'."""
    rec = wslconfig.recommend(int(31.8 * 1024 ** 3), "16gb")
    assert rec.memory == "23GB"
    assert rec.rule.startswith("host RAM 31.8 GB - 8 GB kept for Windows, at most 75% -> memory=23GB"), rec.rule


def test_cli_config_yes_then_noop(tmp_path, capsys):
    path = tmp_path / ".wslconfig"
    write(path, USER_FILE, "utf-16-le", codecs.BOM_UTF16_LE, "\r\n")
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "12GB", "--swap", "8GB", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "Backup:" in out and "`vlkit wsl restart`" in out  # named as typed: not through make here
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
    bad.write_bytes(b"\xfe\xff\x00[")
    assert run_cli(["wsl", "config", "--wslconfig", str(bad), "--memory", "8GB", "--swap", "4GB", "--yes"]) == 1
    assert "was not changed" in capsys.readouterr().err
    assert path.read_bytes() == before and bad.read_bytes() == b"\xfe\xff\x00["


def test_cli_dry_run(tmp_path, capsys):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--memory", "10GB", "--swap", "4GB",
                    "--processors", "6", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+processors=6" in out and "Dry run" in out
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- the file itself

@pytest.mark.parametrize("relative", [True, False])
def test_symlink_is_kept_and_its_target_edited(tmp_path, relative):
    (tmp_path / "dotfiles").mkdir()
    target = tmp_path / "dotfiles" / "wslconfig"
    before = write(target, USER_FILE, "utf-16-le", codecs.BOM_UTF16_LE, "\r\n")
    link = tmp_path / ".wslconfig"
    link.symlink_to("dotfiles/wslconfig" if relative else target)
    result = wslconfig.apply(link, {"memory": "12GB"})
    assert link.is_symlink() and os.readlink(link) == ("dotfiles/wslconfig" if relative else str(target))
    assert wslconfig.get(wslconfig.load(target), "memory") == "12GB"
    # the backup sits where the user looks, beside the link, and holds the target's old bytes
    assert result.backup.parent == tmp_path and result.backup.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "dotfiles").iterdir()) == ["wslconfig"]  # no temp file left


@pytest.mark.parametrize("make, message", [
    (lambda p: p.symlink_to(p.parent / "missing"), "symbolic link to .*missing, which cannot be opened"),
    (lambda p: p.symlink_to(p), "symbolic link"),  # a loop
    (lambda p: p.mkdir(), "it is a folder: name the file in it"),
    (lambda p: os.mkfifo(p), "not a regular file"),  # reading it would block forever
])
def test_paths_that_are_not_a_file_are_refused(tmp_path, make, message):
    path = tmp_path / ".wslconfig"
    make(path)
    entries = sorted(os.listdir(tmp_path))
    with pytest.raises(wslconfig.WslConfigError, match=message):
        wslconfig.apply(path, {"memory": "12GB"})
    assert sorted(os.listdir(tmp_path)) == entries


def test_read_only_file_is_refused_and_kept(tmp_path):
    path = tmp_path / ".wslconfig"
    before = write(path, USER_FILE)
    path.chmod(0o444)
    assert wslconfig.apply(path, {"memory": "12GB"}, dry_run=True).changed  # reading and previewing work
    with pytest.raises(wslconfig.WslConfigError, match="read-only"):
        wslconfig.apply(path, {"memory": "12GB"})
    assert path.read_bytes() == before and os.listdir(tmp_path) == [".wslconfig"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_mode_is_kept(tmp_path):
    path = tmp_path / ".wslconfig"
    write(path, USER_FILE)
    path.chmod(0o600)
    wslconfig.apply(path, {"memory": "12GB"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_backups_made_in_the_same_second_never_share_a_name(tmp_path):
    path = tmp_path / ".wslconfig"
    now = 1_700_000_000.0
    taken = path.with_name(f".wslconfig.vlkit-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.bak")
    taken.write_bytes(b"an older backup")
    barrier = threading.Barrier(16)
    made: dict[int, object] = {}

    def backup(i):
        barrier.wait()
        made[i] = wslconfig.make_backup(path, f"state {i}".encode(), now=now)

    threads = [threading.Thread(target=backup, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert taken.read_bytes() == b"an older backup"  # never overwritten
    assert len({p for p in made.values()}) == 16 and taken not in made.values()
    assert all(made[i].read_bytes() == f"state {i}".encode() for i in range(16))


def test_a_change_by_another_program_while_editing_wins(tmp_path, monkeypatch):
    path = tmp_path / ".wslconfig"
    write(path, USER_FILE)
    real_backup = wslconfig.make_backup

    def backup_then_someone_edits(*args, **kw):
        made = real_backup(*args, **kw)
        path.write_bytes(b"[wsl2]\nmemory=20GB\n")  # another editor saves in between
        return made

    monkeypatch.setattr(wslconfig, "make_backup", backup_then_someone_edits)
    with pytest.raises(wslconfig.WslConfigError, match="another program changed it"):
        wslconfig.apply(path, {"memory": "12GB"})
    assert path.read_bytes() == b"[wsl2]\nmemory=20GB\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_runs_lose_nothing(tmp_path):
    """Eight runs at once: each one edits the file the run before it wrote, and backs that up."""
    path = tmp_path / ".wslconfig"
    original = write(path, USER_FILE)
    barrier = threading.Barrier(8)
    results: list[wslconfig.ApplyResult] = []

    def run(i):
        barrier.wait()
        results.append(wslconfig.apply(path, {"memory": f"{10 + i}GB"}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r.written for r in results)
    backed_up = sorted(wslconfig.get(wslconfig.load(r.backup), "memory") for r in results)
    final = wslconfig.get(wslconfig.load(path), "memory")
    # the backups hold the original (6GB) and every value written except the last: nothing was lost
    assert sorted(backed_up + [final]) == sorted(["6GB"] + [f"{10 + i}GB" for i in range(8)])
    assert any(r.backup.read_bytes() == original for r in results)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_windows_path_is_refused_with_the_path_wsl_sees(tmp_path, monkeypatch, capsys):
    """--wslconfig C:\\Users\\me\\.wslconfig inside WSL names no folder: it must not become a file of that
    name in the current folder (which WSL never reads)."""
    monkeypatch.chdir(tmp_path)
    code = run_cli(["wsl", "config", "--wslconfig", r"C:\Users\me\.wslconfig", "--memory", "12GB", "--swap", "8GB",
                    "--yes"])
    assert code == 1 and list(tmp_path.iterdir()) == []
    assert "in WSL it is --wslconfig /mnt/c/Users/me/.wslconfig" in capsys.readouterr().err


def test_auto_sizes_for_the_profile_this_gpu_gets(tmp_path, capsys, monkeypatch):
    """`make wsl-config` (PROFILE=auto): the planner's pick for the card (a recorded H100's nvidia-smi
    answers: vLLM's 16gb profile, whose VM wants 12 GB), as `vlkit up` picks it."""
    import os

    from tests.doctor_helpers import h100_smi

    h100_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / ".wslconfig"
    write(path, ["[wsl2]", "memory=4GB"])
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Recommended for the 16gb profile" in out
    assert "profile: the one vlkit up picks for Qwen/Qwen3-VL-2B-Instruct on this card" in out
    assert path.read_text() == "[wsl2]\nmemory=4GB\n"  # a dry run


@pytest.mark.parametrize(("flags", "profile", "why"), [
    (["--gpu-memory", "12GiB"], "16gb", "the one vlkit up picks for Qwen/Qwen3-VL-2B-Instruct"),
    (["--gpu-memory", "12GiB", "--model", "Qwen/Qwen3-VL-8B-Instruct"], "8gb",  # vLLM cannot hold 8B there
     "the one vlkit up picks for Qwen/Qwen3-VL-8B-Instruct"),
    (["--gpu-memory", "2GiB"], "8gb", "Qwen/Qwen3-VL-2B-Instruct fits neither profile on this card"),
])
def test_auto_plans_with_the_model_context_and_card_up_would_get(tmp_path, capsys, flags, profile, why):
    path = tmp_path / ".wslconfig"
    write(path, ["[wsl2]", "memory=4GB"])
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    assert f"Recommended for the {profile} profile" in out and why in out


def test_auto_without_a_gpu_sizes_for_8gb_and_says_why(tmp_path, capsys, monkeypatch):
    """This machine has no GPU (neither NVML nor an nvidia-smi on PATH answers)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    path = tmp_path / ".wslconfig"
    write(path, ["[wsl2]", "memory=4GB"])
    assert run_cli(["wsl", "config", "--wslconfig", str(path), "--dry-run", "--profile", "auto"]) == 0
    out = capsys.readouterr().out
    assert "Recommended for the 8gb profile" in out
    assert "profile: none picked for this machine (" in out and "--profile 16gb" in out
