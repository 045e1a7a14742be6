"""The two commands' promises that live in the Makefile: `make demo` needs no root (only the test suite's
set-up installs Debian packages), and `make test` does install what the tests drive."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOT_ONLY = re.compile(r"\b(apt-get|apt|aptitude|dpkg\s+-i|sudo|su|doas|pkexec)\b\s")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def commands(target: str) -> list[str]:
    """Every command `make TARGET` runs, its prerequisites' included, whatever is up to date (-B), none run (-n)."""
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("target", ["demo", "setup"])
def test_the_demo_and_its_setup_never_ask_for_root(target):
    root_only = [line for line in commands(target) if ROOT_ONLY.search(line + " ")]
    assert root_only == [], f"`make {target}` would run, as root only: {root_only}"


@pytest.mark.parametrize("target", ["test", "test-fast"])
def test_the_test_setup_installs_the_debian_packages_the_tests_drive(target):
    lines = commands(target)
    assert any("apt-get install -y" in line for line in lines)
    assert any("chromium" in line for line in lines)
