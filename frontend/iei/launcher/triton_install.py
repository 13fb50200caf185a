"""Find NVIDIA Triton Inference Server: a `tritonserver` on PATH (NGC containers), else the binary
that the `nvidia-pytriton` wheel ships. The wheel's Python backend needs assembling: the backend
library plus the stub built for this interpreter's Python version, in a folder passed as
`--backend-directory`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TritonStartupError


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_directory: Path | None  # None: the binary's own default (/opt/tritonserver/backends)
    library_path: list[str] = field(default_factory=list)


def find_triton(work_dir: Path) -> TritonInstall:
    """A `tritonserver` on PATH, else the nvidia-pytriton wheel's, with its Python backend."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartupError(
            "no tritonserver on PATH and the nvidia-pytriton package is not installed "
            "(pip install 'iei[serve]'; make setup installs it)"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartupError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backend = work_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in (*(server / "backends" / "python").glob("*.*"), stub):
        shutil.copy2(source, backend / source.name)
    # The stub links libpython3.X.so: this interpreter's own must come before the system's.
    libraries = [
        str(sysconfig.get_config_var("LIBDIR")),
        str(package.parent / "nvidia_pytriton.libs"),
    ]
    return TritonInstall(server / "bin" / "tritonserver", work_dir / "backends", libraries)
