"""vlkit's version: pyproject.toml's, whether the package is installed or run from a checkout, and the
same for the service (system_fingerprint, /version) as for the host tools (the images' tags)."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from tests.docker_helpers import ROOT

PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# Each in a fresh interpreter: "not installed" is importlib.metadata not finding the package.
REPORT = """
from importlib import metadata
if {hidden}:
    def version(name, found=metadata.version):
        if name == "vlkit":
            raise metadata.PackageNotFoundError(name)
        return found(name)
    metadata.version = version
from service.api.serving import vlkit_version
from scripts.images import VLKIT_VERSION
print(vlkit_version(), VLKIT_VERSION)
"""


@pytest.mark.parametrize("installed", [True, False])
def test_the_service_and_the_host_tools_report_pyprojects_version(installed):
    res = subprocess.run([sys.executable, "-c", REPORT.format(hidden=not installed)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [PYPROJECT_VERSION, PYPROJECT_VERSION]


def test_the_host_tools_get_it_without_torch():
    """The host venv has no torch: the image tags' version must not pull it in."""
    res = subprocess.run([sys.executable, "-c", "import sys, scripts.images; print('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr
