"""The 8gb image is built from exactly what it installs (pyproject.toml, service/, bench/): its COPY
lines, .dockerignore and the source hash that decides a rebuild name the same paths, and editing the
host CLI (scripts/, wsl/) or the README leaves the image current."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from scripts import images
from scripts.stack.docker import SOURCE_PATHS, source_hash
from tests.docker_helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile.8gb"
CI_ONLY = {"docker/wheels"}   # CI's torch wheel: sent to the build, not part of the source


def _norm(path: str) -> str:
    return path.strip().rstrip("/").removeprefix("./")


def _copied() -> set[str]:
    sources = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources |= {_norm(p) for p in line.split()[1:-1] if not p.startswith("--")}
    return sources - CI_ONLY


def test_copy_lines_dockerignore_and_source_hash_agree():
    hashed = {_norm(p) for p in SOURCE_PATHS["8gb"]} - {"docker/Dockerfile.8gb"}
    sent = {_norm(l[1:]) for l in (ROOT / ".dockerignore").read_text().splitlines() if l.startswith("!")} - CI_ONLY
    assert _copied() == hashed == sent == {"pyproject.toml", "service", "bench"}


def _imports(folder) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_what_the_image_runs_imports_nothing_it_does_not_copy():
    for folder in ("service", "bench"):
        assert not _imports(ROOT / folder) & {"scripts", "wsl"}, folder


@pytest.fixture
def tree(tmp_path):
    """A copy of what the hash reads, plus the host CLI beside it."""
    for rel in [*SOURCE_PATHS["8gb"], "scripts", "wsl", "README.md"]:
        src, dst = ROOT / rel, tmp_path / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return tmp_path


def test_editing_the_host_cli_or_the_readme_keeps_the_image_current(tree):
    before = source_hash(tree, "8gb")
    (tree / "scripts" / "cli.py").write_text("# edited\n", encoding="utf-8")
    (tree / "wsl" / "new.py").write_text("x = 1\n", encoding="utf-8")
    (tree / "README.md").write_text("# changed\n", encoding="utf-8")
    assert source_hash(tree, "8gb") == before
    (tree / "service" / "settings.py").write_text("# edited\n", encoding="utf-8")
    assert source_hash(tree, "8gb") != before


def test_the_image_installs_only_the_service(tmp_path):
    """`pip install --no-deps .` over exactly the copied paths (no README) installs service alone."""
    src = tmp_path / "src"
    src.mkdir()
    for rel in sorted(_copied()):
        (shutil.copytree if (ROOT / rel).is_dir() else shutil.copy2)(ROOT / rel, src / rel)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "wheel").glob("vlkit-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"service", wheel.name.split("-py")[0] + ".dist-info"}
    # The host CLI's entry point comes with the metadata; the Dockerfile removes it, as it would only fail.
    assert re.search(r"rm -rf [^\n]*/opt/venv/bin/vlkit\b", DOCKERFILE.read_text())


def test_dockerfile_user_is_the_uid_vlkit_up_checks_folders_for():
    text = DOCKERFILE.read_text()
    assert f"useradd --uid {images.SERVICE_UID} " in text
    assert f"USER {images.SERVICE_UID}:{images.SERVICE_UID}" in text
