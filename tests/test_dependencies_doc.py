"""docs/DEPENDENCIES.md says why each pinned dependency is here: every pin of pyproject.toml (the
host's and every extra's) has its row, and a version a row names is the pinned one."""
from __future__ import annotations

import re
import tomllib

from tests.docker_helpers import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)")


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = {}
    for requirement in requirements:
        found = PIN.match(requirement)
        assert found, f"not pinned exactly: {requirement}"
        pins[found.group(1)] = found.group(3)
    return pins


def _name(name: str) -> str:
    """A regex for the package's name as people write it (PyYAML, pyyaml; nvidia-ml-py, nvidia_ml_py)."""
    return r"(?<![\w-])" + "[-_.]".join(map(re.escape, re.split(r"[-_.]+", name))) + r"(?![\w-])"


def test_every_pinned_dependency_has_its_reason_and_its_version():
    text = (ROOT / "docs" / "DEPENDENCIES.md").read_text(encoding="utf-8")
    # the table's first column: the packages, with the version where a row names one
    page = "\n".join(line.split("|")[1] for line in text.splitlines() if line.startswith("| "))
    pins = _pins()
    missing = [name for name in pins if not re.search(_name(name), page, re.I)]
    assert not missing, f"docs/DEPENDENCIES.md does not say why these are pinned: {missing}"
    for name, version in pins.items():
        for stated in re.findall(_name(name) + r"(?:\[[^\]]*\])? (\d+(?:\.\d+)+)\b", page, re.I):
            assert stated == version, f"docs/DEPENDENCIES.md names {name} {stated}; pyproject.toml pins {version}"
