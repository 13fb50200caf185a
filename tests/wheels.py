"""Build IEI's wheel and install it into fresh virtual environments, for the packaging tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a source tree holds that is no part of a build.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def build_wheel(target: Path) -> Path:
    """The project's wheel, built from a copy of the tree (the build writes into its source)."""
    source = target / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(target), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    [wheel] = target.glob("iei-*.whl")
    return wheel


def fresh_environment(folder: Path, *, borrow_packages: bool = False) -> Path:
    """A new virtual environment; its python. With `borrow_packages`, it sees this environment's
    packages (torch is gigabytes) through a .pth line, which is not a site folder: this
    environment's editable install of `iei` is not active there."""
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    if borrow_packages:
        target_site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        Path(target_site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def constraints_of_this_environment(path: Path) -> Path:
    """This environment's versions, so that a fresh one installs the same."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path.write_text("\n".join(line for line in frozen.splitlines() if "==" in line) + "\n")
    return path


def pip_install(python: Path, *arguments: str) -> None:
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *arguments],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
