"""scripts/safe_file.py: atomic writes keep an existing file's mode and give a new one what open()
would (the temporary file mkstemp makes is 0600, which left teammates unable to read new manifests)."""
from __future__ import annotations

import os

from scripts.safe_file import write_atomic


def test_a_new_file_gets_the_umasks_mode_and_an_existing_one_keeps_its_own(tmp_path):
    old = os.umask(0o022)
    try:
        new = tmp_path / "service.yaml"
        write_atomic(new, b"a: 1\n")
        assert new.stat().st_mode & 0o777 == 0o644 and new.read_bytes() == b"a: 1\n"
        kept = tmp_path / "vlkit.env"
        kept.write_bytes(b"x\n")
        kept.chmod(0o600)
        write_atomic(kept, b"y\n")
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_bytes() == b"y\n"
        os.umask(0o077)
        private = tmp_path / "secret.env"
        write_atomic(private, b"k\n")
        assert private.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
