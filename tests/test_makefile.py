"""`make setup` (and so `make run`, `make test`) picks a Python that the pinned wheels support, or
stops with one line that says what to install. Hermetic: fake interpreters on a PATH of their
own."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="no make on this machine")


def make_setup(
    tmp_path: Path, pythons: dict[str, str], *arguments: str
) -> subprocess.CompletedProcess[str]:
    """`make -n setup` in a copy of the Makefile, with only `pythons` (name: the version it
    reports) and the tools the Makefile's own lines use on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("head", "cut", "grep", "awk"):
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    for name, version in pythons.items():
        fake = bin_dir / name
        fake.write_text(f"#!/bin/sh\necho {version}\n")
        fake.chmod(0o755)
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    return subprocess.run(
        [str(MAKE), "-n", "setup", *arguments], cwd=tmp_path, env={"PATH": str(bin_dir)},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("pythons", "chosen"),
    [
        ({"python3": "3.13", "python3.13": "3.13", "python3.12": "3.12"}, "python3.12"),
        ({"python3": "3.13", "python3.11": "3.11"}, "python3.11"),
        ({"python3": "3.12"}, "python3"),
        ({"python3": "3.11", "python3.12": "3.12"}, "python3"),
    ],
)
def test_setup_takes_a_python_the_pinned_wheels_support(tmp_path, pythons, chosen):
    result = make_setup(tmp_path, pythons)
    assert result.returncode == 0, result.stderr
    assert f"{chosen} -m venv .venv" in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("pythons", "arguments", "named"),
    [
        ({"python3": "3.13", "python3.13": "3.13"}, (), "python3 is 3.13"),
        ({"python3": "3.14"}, (), "python3 is 3.14"),
        ({"python3": "3.10"}, (), "python3 is 3.10"),
        ({}, (), "python3 is not found"),
        ({"python3.13": "3.13", "python3.12": "3.12"}, ("PYTHON=python3.13",),
         "python3.13 is 3.13"),
    ],
)  # fmt: skip
def test_without_one_setup_stops_with_one_line_saying_what_to_install(
    tmp_path, pythons, arguments, named
):
    result = make_setup(tmp_path, pythons, *arguments)
    assert result.returncode != 0
    assert result.stdout == ""  # nothing was run, not even the venv
    [line] = result.stderr.splitlines()
    assert "IEI needs Python 3.11 or 3.12" in line and named in line, line
    assert "install Python 3.12" in line and "make PYTHON=" in line
