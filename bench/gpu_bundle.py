"""The GPU bench's offline bundle: what a GPU host without a package index lacks, in one folder.

    python3 -m bench.gpu_bundle stage      # `make gpu-bundle`, where the package index answers
    python3 -m bench.gpu_bundle run ARGS   # `make bench-gpu` on the GPU host: install, check, bench

A lent GPU host has Python 3.12 (with libpython3.12.so), a CUDA torch and torchvision, numpy 2,
and no package index. `stage` puts into `gpu-bundle/` (git-ignored):

- `wheels.tar.xz`: the wheels IEI's server and the bench need for CPython 3.12 on manylinux
  x86_64, except torch and torchvision (the host's): numpy 1.26.4 (Triton 2.51's Python stub
  mis-reads BYTES tensors under numpy 2, python_backend #384), transformers, tokenizers,
  tritonclient, the frontend's packages, nvidia-nvimgcodec-cu13 with nvJPEG. Tests, type stubs
  and the other Pythons' binaries are left out of the wheels, and their binaries' symbol tables
  and debug sections (`strip --strip-unneeded`: ml_dtypes alone ships 24 MB of debug data); each
  RECORD is rewritten to match. Every wheel is stored uncompressed inside the tarball, so that xz
  compresses across them.
- `tritonserver.tar.xz`: the Triton server of the nvidia-pytriton wheel, trimmed to the binary,
  the Python backend, the Python 3.12 stub and the libraries they link, stripped, without the
  bundled libpython (the host's is used), laid out as the wheel installs it
  (`pytriton/tritonserver`, `nvidia_pytriton.libs`) so that `iei serve` finds it as it finds the
  wheel's. ICU's data library (29 MB) is replaced by an empty ICU data package of the same name:
  ICU reaches Triton only through libxml2's character-set conversions (libarchive's and the
  cloud storage's XML), never for a model repository on disk, so the libraries load and nothing
  asks for the data (ICU's own build makes the same stub, `stubdata`, for data loaded elsewhere).
- `MANIFEST.json`: what is in it, and its size with the repository's tracked files.

`run` installs them into `.gpu-env/` (`pip install --no-index --no-deps --target`), then checks
what fails fast, stopping at the first problem with one line: Python 3.12, the libpython3.12
shared library the stub links, `ldd` of the stub and of tritonserver, the imports (torch from the
host, numpy 1.26.4, transformers, tritonclient, nvImageCodec), CUDA available, and one small JPEG
decoded by nvImageCodec on cuda:0 as the encoder decodes (its import alone succeeds without a
loadable libnvjpeg). Then it runs `python -m bench.gpu` with that environment.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "gpu-bundle"
ENV = ROOT / ".gpu-env"
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 50  # the bundle and the repository together: what one device call carries easily
# `make bench-gpu`'s seconds from the moment this runner starts: its install and checks, then
# bench.gpu's measurements (bench.gpu's --budget; bench.gpu is told when the run began).
DEFAULT_BUDGET = 480.0
PYTRITON = "nvidia-pytriton==0.7.0"
# What the server (iei serve: launcher, frontend, Triton's Python models) and the bench import,
# with their dependencies; torch and torchvision are the host's.
REQUIREMENTS = (
    "numpy==1.26.4",
    "transformers>=4.46",
    "tokenizers",
    "safetensors>=0.4",
    "huggingface-hub>=1.0",
    "tritonclient[http,grpc]>=2.50,<3",
    "protobuf>=6.30,<7",
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "httptools",
    "pydantic>=2.7",
    "pydantic-settings>=2.3",
    "prometheus-client>=0.20",
    "pybase64>=1.4",
    "httpx>=0.27",
    "orjson>=3.10",
    "tqdm>=4.66",
    "aiohttp",
    "nvidia-ml-py>=13",
    "nvidia-nvimgcodec-cu13[nvjpeg]==0.9.0.20",
)
# Distributions pulled in that nothing imports offline (the hub's transfer client, optional
# uvicorn speed-ups, transformers' optional hub kernels and its command line), or that the host
# has (pillow: torchvision's).
LEFT_OUT = {
    "hf-xet", "uvloop", "watchfiles", "websockets", "pillow",
    "kernels", "tomlkit", "typer", "rich", "pygments", "shellingham",
}  # fmt: skip
# transformers' models/ folders kept: IEI's families (the seed's classifiers and the retrieval
# models, SigLIP2's Gemma tokenizer), the auto classes, and every folder their code imports
# (`transformers_models`): about 1.6 of the wheel's 44 MiB of models. The other folders keep
# their __init__.py alone.
TRANSFORMERS_MODELS = (
    "auto", "vit", "deit", "beit", "convnext", "swin", "clip", "siglip", "siglip2", "dinov2",
    "dinov2_with_registers", "bit", "gemma",
)  # fmt: skip
# A model folder's code naming another (`from ..clip.modeling_clip import`, ...).
MODEL_IMPORT = re.compile(
    r"from \.\.(\w+)[. ]|from \.\.\.models\.(\w+)|transformers\.models\.(\w+)"
)
# Files no one runs here, by wheel: the test suites, type stubs, other Pythons' binaries,
# nvImageCodec's CPU and non-JPEG codecs (PIL does those), headers and tools.
DROPPED = (
    "*/tests/*", "*.pyi", "numpy/f2py/*", "numpy/distutils/*", "numpy/doc/*",
    "nvidia/nvimgcodec/nvimgcodec_impl.cpython-3[!1]*",
    "nvidia/nvimgcodec/nvimgcodec_impl.cpython-31[!2]*",
    "nvidia/nvimgcodec/extensions/lib*[!g]_ext.so*", "nvidia/nvimgcodec/include/*",
    "nvidia/nvimgcodec/tools/*", "nvidia/cu13/include/*",
)  # fmt: skip
KEPT = ("nvidia/nvimgcodec/extensions/libnvjpeg_ext.so*",)  # the GPU JPEG decoder itself
# The nvidia-pytriton wheel's files the server needs (libpython excluded: the host's).
TRITON_FILES = (
    "pytriton/tritonserver/bin/tritonserver",
    "pytriton/tritonserver/backends/python/*",
    f"pytriton/tritonserver/python_backend_stubs/{PYTHON}/triton_python_backend_stub",
    "pytriton/tritonserver/caches/*",
    "nvidia_pytriton.libs/*",
)
TRITON_DROPPED = ("nvidia_pytriton.libs/libpython3*",)
ICU_DATA = re.compile(r"nvidia_pytriton\.libs/libicudata-[0-9a-f]+\.so\.(\d+)\.\d+$")
# An ICU common-data package with no items, exported as the symbol libicuuc links
# (icudt<major>_dat): its header (size, magic 0xda27, UDataInfo: little-endian, ASCII, 2-byte
# UChar, format "CmnD" 1.0), padded to 32 bytes, then a table of no entries.
ICU_STUB_C = """
struct icu_empty_package {
    unsigned short header_size;
    unsigned char magic1, magic2;
    unsigned short info_size, reserved_word;
    unsigned char big_endian, charset_family, sizeof_uchar, reserved_byte;
    unsigned char data_format[4], format_version[4], data_version[4];
    unsigned char padding[8];
    unsigned int count, reserved;
};
__attribute__((visibility("default"))) const struct icu_empty_package icudt%(major)s_dat = {
    32, 0xda, 0x27, 20, 0, 0, 0, 2, 0, {'C', 'm', 'n', 'D'}, {1, 0, 0, 0}, {0, 0, 0, 0},
    {0}, 0, 0
};
"""


def log(message: str) -> None:
    sys.stderr.write(f"[gpu-bundle] {message}\n")


def dropped(name: str, models: frozenset[str] | None = None) -> bool:
    """Whether a wheel's file stays out; `models`: transformers' model folders kept."""
    if any(fnmatch.fnmatch(name, pattern) for pattern in KEPT):
        return False
    parts = name.split("/")
    if models is not None and parts[:2] == ["transformers", "models"] and len(parts) > 3:
        # Every folder's __init__ stays: the auto classes import a folder to look for a class
        # by name (CLIPTokenizer in aimv2's first) and go on when it is not there.
        return parts[2] not in models and parts[3:] != ["__init__.py"]
    return any(fnmatch.fnmatch(name, pattern) for pattern in DROPPED)


def transformers_models(files: dict[str, str], wanted: Sequence[str]) -> frozenset[str]:
    """The model folders of transformers' `files` (path -> source, as in the wheel or the
    installed package) that `wanted` needs: those, and every folder their code imports."""
    folders = {p.split("/")[2] for p in files if p.startswith("transformers/models/")}
    kept: set[str] = set()
    todo = [m for m in wanted if m in folders]
    while todo:
        folder = todo.pop()
        if folder in kept:
            continue
        kept.add(folder)
        prefix = f"transformers/models/{folder}/"
        for path, source in files.items():
            if path.startswith(prefix) and path.endswith(".py"):
                named = {a or b or c for a, b, c in MODEL_IMPORT.findall(source)}
                todo += sorted((named & folders) - kept)
    return frozenset(kept)


def stripped(data: bytes) -> bytes:
    """An ELF file without its symbol table and debug sections (`strip --strip-unneeded`: the
    dynamic symbols stay, so it links and loads as before); anything else, or no strip, as is."""
    if not data.startswith(b"\x7fELF") or shutil.which("strip") is None:
        return data
    with tempfile.TemporaryDirectory(prefix="iei-strip-") as tmp:
        path = Path(tmp) / "elf"
        path.write_bytes(data)
        done = subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True)
        return path.read_bytes() if done.returncode == 0 else data


def icu_data_stub(name: str) -> bytes | None:
    """An empty ICU data library standing in for Triton's `name` (same file name, soname and
    symbol), built by the C compiler; None where `name` is not ICU's data or none compiles."""
    matched = ICU_DATA.fullmatch(name)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if matched is None or compiler is None:
        return None
    soname = name.rsplit("/", 1)[1]
    with tempfile.TemporaryDirectory(prefix="iei-icu-") as tmp:
        source, library = Path(tmp) / "icudata.c", Path(tmp) / soname
        source.write_text(ICU_STUB_C % {"major": matched.group(1)})
        command = [compiler, "-shared", "-fPIC", "-O2", "-s", f"-Wl,-soname,{soname}",
                   "-o", str(library), str(source)]  # fmt: skip
        if subprocess.run(command, capture_output=True).returncode != 0:
            return None
        return library.read_bytes()


def record_line(name: str, data: bytes) -> str:
    """A wheel RECORD's line for `name` holding `data` (PEP 376: urlsafe base64 sha256)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def repack(wheel: Path, target: Path) -> int:
    """`wheel` without its DROPPED files (and transformers' without the model folders IEI does
    not use), its binaries stripped, stored uncompressed, RECORD rewritten; files left out."""
    with zipfile.ZipFile(wheel) as source:
        infos = source.infolist()
        models = None
        if distribution(wheel) == "transformers":
            sources = {i.filename: source.read(i).decode("utf-8", "replace") for i in infos
                       if i.filename.startswith("transformers/models/")
                       and i.filename.endswith(".py")}  # fmt: skip
            models = transformers_models(sources, TRANSFORMERS_MODELS)
        kept = [i for i in infos if not dropped(i.filename, models)]
        files = {i.filename: stripped(source.read(i)) for i in kept}
    records = {n: record_line(n, d) for n, d in files.items() if not n.endswith("/RECORD")}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in kept:
            data = files[info.filename]
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [x.split(",")[0] for x in data.decode().splitlines() if x.strip()]
                data = "".join(
                    f"{records.get(x, x + ',,')}\n" for x in lines if x in files
                ).encode()
            info.compress_type = zipfile.ZIP_STORED
            out.writestr(info, data)
    return len(infos) - len(kept)


def pip(*args: str, timeout: float | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, timeout=timeout)


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def xz_tar(path: Path, files: list[tuple[str, bytes, int]]) -> None:
    """A tar of `files` (name, bytes, mode), compressed by xz -9 on every core."""
    with (
        tempfile.NamedTemporaryFile(suffix=".tar", dir=path.parent, delete=False) as raw,
        tarfile.open(fileobj=raw, mode="w") as tar,
    ):
        for name, data, mode in files:
            add_to_tar(tar, name, data, mode)
    subprocess.run(["xz", "-9", "-T0", "-f", raw.name], check=True)
    os.replace(raw.name + ".xz", path)


def stage(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iei-gpu-bundle-") as tmp:
        work = Path(tmp)
        platforms = [f"--platform={p}" for p in PLATFORMS]
        common = ["download", "--quiet", "--only-binary=:all:", f"--python-version={PYTHON}"]
        pip(*common, *platforms, "--dest", str(work / "wheels"), *REQUIREMENTS)
        pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
            str(work / "pytriton"), PYTRITON)  # fmt: skip
        wheels = []
        for wheel in sorted((work / "wheels").glob("*.whl")):
            if distribution(wheel) in LEFT_OUT:
                continue
            repacked = work / "stored" / wheel.name
            repacked.parent.mkdir(exist_ok=True)
            left = repack(wheel, repacked)
            wheels.append((wheel.name, repacked.read_bytes(), 0o644))
            log(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB ({left} files left out)")
        xz_tar(out / "wheels.tar.xz", wheels)
        [pytriton] = (work / "pytriton").glob("*.whl")
        server = triton_files(pytriton)
        xz_tar(out / "tritonserver.tar.xz", server)
    manifest = {
        "python": PYTHON,
        "wheels": sorted(name for name, _, _ in wheels),
        "tritonserver": PYTRITON,
        "files": {p.name: sha256(p) for p in sorted(out.glob("*.tar.xz"))},
        "bundle_mib": round(folder_bytes(out) / 2**20, 1),
        "repository_mib": round(repository_bytes() / 2**20, 1),
    }
    manifest["total_mib"] = round(manifest["bundle_mib"] + manifest["repository_mib"], 1)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def triton_files(pytriton: Path) -> list[tuple[str, bytes, int]]:
    """The wheel's TRITON_FILES (name, bytes, mode), stripped, ICU's data library emptied."""
    server = []
    with zipfile.ZipFile(pytriton) as wheel:
        for info in wheel.infolist():
            name = info.filename
            wanted = any(fnmatch.fnmatch(name, p) for p in TRITON_FILES)
            # Folders are made by their files: a folder's zip entry would go into the tar as a
            # regular file of that name, and tarfile's extraction would then fail on its files.
            if info.is_dir() or not wanted or any(fnmatch.fnmatch(name, p) for p in TRITON_DROPPED):
                continue
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            data = icu_data_stub(name) if ICU_DATA.fullmatch(name) else None
            if data is None:
                data = stripped(wheel.read(info))
            else:
                log(f"{name}: an empty ICU data package ({len(data)} bytes) in its place")
            server.append((name, data, mode))
    server.append(("pytriton/__init__.py", b"", 0o644))  # found by find_spec, never run
    return server


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def repository_bytes() -> int:
    """The tracked files of the checkout (what travels with the bundle)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    return sum(f.stat().st_size for f in files if f.is_file())


# --- on the GPU host -------------------------------------------------------------------------


class Missing(RuntimeError):
    """What the GPU host lacks, in one line."""


IMPORTS_PROBE = (
    "import torch, numpy, transformers, tritonclient.grpc, tritonclient.http, PIL, fastapi\n"
    "assert numpy.__version__ == '1.26.4', f'numpy {numpy.__version__} comes first'\n"
    "assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA device'\n"
    "from nvidia import nvimgcodec\n"
    "import iei.cli\n"
)
# nvImageCodec imports even where libnvjpeg cannot be loaded (every decode then returns None):
# only a decode proves it. The encoder's own decoder and warm-up (iei_runtime.jpeg_decoders:
# nvimgcodec.Decoder on the GPU's backends, one small JPEG) on cuda:0, as iei_encoder starts.
DECODE_FAILED = 3  # the probe's exit status when the decode fails; its last stderr line says why
DECODE_PROBE = """
import sys, torch
sys.path.append(%(repository)r)  # after the checkout: its iei is the frontend
from iei_runtime.jpeg_decoders import choose_jpeg_decoder, first_line
try:
    choose_jpeg_decoder("nvimagecodec", torch.device("cuda", 0))
except Exception as exc:
    sys.stderr.write(first_line(exc) + "\\n")
    raise SystemExit(%(status)d)
"""


def seconds_left(deadline: float | None, step: str) -> float | None:
    """What the run's budget leaves for a setup step (None: no deadline); Missing if nothing."""
    if deadline is None:
        return None
    left = deadline - time.time()
    if left <= 0:
        raise Missing(f"the budget ran out before {step}")
    return left


def bounded(command: list[str], deadline: float | None, step: str, **options: object) -> Any:
    """subprocess.run(command) given what the budget leaves; Missing, in one line, when that
    is not enough."""
    left = seconds_left(deadline, step)
    try:
        return subprocess.run(command, timeout=left, **options)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise Missing(f"{step} did not finish in the {left:.0f} s the budget left") from None


def install(bundle: Path, env: Path, deadline: float | None = None) -> Path:
    """The bundle installed into `env` (once per bundle); the folder to put on PYTHONPATH.
    `deadline`: the Unix time by which the run's budget is spent."""
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    site = env / "site"
    stamp = env / "installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == manifest["files"]:
        return site
    shutil.rmtree(env, ignore_errors=True)
    wheels = env / "wheels"
    wheels.mkdir(parents=True)
    with tarfile.open(bundle / "wheels.tar.xz") as tar:
        tar.extractall(wheels, filter="data")
    names = sorted(str(p) for p in wheels.glob("*.whl"))
    log(f"installing {len(names)} wheels into {site}")
    step = "the offline install of the wheels"
    try:
        pip("install", "--quiet", "--no-index", "--no-deps", "--target", str(site), *names,
            timeout=seconds_left(deadline, step))  # fmt: skip
    except subprocess.TimeoutExpired:
        raise Missing(f"{step} did not finish in what the budget left") from None
    except subprocess.CalledProcessError as exc:
        raise Missing(f"{step} failed (pip exited {exc.returncode}; its output is above)") from None
    with tarfile.open(bundle / "tritonserver.tar.xz") as tar:
        tar.extractall(site, filter="data")
    shutil.rmtree(wheels)
    stamp.write_text(json.dumps(manifest["files"]))
    return site


def environment(site: Path) -> dict[str, str]:
    """The bench's environment: the bundle's packages (numpy 1.26.4 first), IEI's checkout."""
    paths = [str(site), str(ROOT / "frontend"), str(ROOT)]
    previous = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, *([previous] if previous else [])]),
        "PATH": os.pathsep.join([str(site / "bin"), os.environ.get("PATH", "")]),
    }


def check(site: Path, deadline: float | None = None) -> None:
    """What fails fast on a GPU host, in order, each step within what the budget leaves
    (`deadline`, a Unix time); raises Missing with one line."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version != PYTHON:
        raise Missing(f"Python {PYTHON} is needed (the bundle's wheels and stub), not {version}")
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    libpython = Path(libdir) / f"libpython{PYTHON}.so.1.0"
    if not libpython.exists():
        raise Missing(f"{libpython} is missing: the Triton stub links the shared libpython{PYTHON}")
    server = site / "pytriton" / "tritonserver"
    libs = os.pathsep.join([libdir, str(site / "nvidia_pytriton.libs")])
    stub = server / "python_backend_stubs" / PYTHON / "triton_python_backend_stub"
    backend = server / "backends" / "python" / "libtriton_python.so"
    for binary in (stub, server / "bin" / "tritonserver", backend):
        env = {**os.environ, "LD_LIBRARY_PATH": libs}
        command = ["ldd", str(binary)]
        result = bounded(command, deadline, "ldd", capture_output=True, text=True, env=env)
        missing = [x.split()[0] for x in result.stdout.splitlines() if "not found" in x]
        if result.returncode != 0 or missing:
            why = ", ".join(missing) or result.stderr.strip().splitlines()[0]
            raise Missing(f"{binary.name} cannot load: {why} (ldd)")
    repository = str(ROOT / "model_repository")
    probe = IMPORTS_PROBE + DECODE_PROBE % {"repository": repository, "status": DECODE_FAILED}
    result = bounded([sys.executable, "-c", probe], deadline, "the import and decode check",
                     capture_output=True, text=True, env=environment(site))  # fmt: skip
    if result.returncode != 0:
        lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
        last = lines[-1] if lines else result.returncode
        if result.returncode == DECODE_FAILED:
            raise Missing(f"nvImageCodec cannot decode a JPEG on cuda:0: {last}")
        raise Missing(f"import check failed: {last}")


def default_out() -> Path:
    """Where `make bench-gpu` writes without --out: `$OUT/docs` where the environment sets OUT
    (the folder a lent GPU machine hands back, and nothing else), else the repository's docs/."""
    out = os.environ.get("OUT")
    return Path(out) / "docs" if out else ROOT / "docs"


def bench_options(bench_args: list[str]) -> argparse.Namespace:
    """What the runner reads of bench.gpu's arguments: --budget (the whole run's seconds),
    --started (when the run began, if a caller already says) and --out."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    parser.add_argument("--started", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_known_args(bench_args)[0]
    options.out = options.out or default_out()
    return options


def note_setup(out: Path, line: str) -> None:
    """The setup's outcome in `<out>/benchmarks/gpu-setup.txt`, beside the rows: a run the
    checks stopped still hands back why (a device returns only its output folder)."""
    path = out / "benchmarks" / "gpu-setup.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n")


def run(bench_args: list[str], bundle: Path = BUNDLE, env: Path = ENV) -> int:
    """Install, check, then bench.gpu, all within --budget seconds from now: bench.gpu is told
    when the run began (--started), so its windows shrink by what the setup took."""
    options = bench_options(bench_args)
    started = time.time() if options.started is None else options.started
    deadline = started + options.budget
    try:
        if not (bundle / "MANIFEST.json").exists():
            raise Missing(f"no bundle at {bundle}: run `make gpu-bundle` where the index answers")
        site = install(bundle, env, deadline)
        check(site, deadline)
    except Missing as exc:
        print(f"bench-gpu: {exc}", flush=True)  # noqa: T201 (the one line the user reads)
        note_setup(options.out, f"bench-gpu: {exc}")
        return 2
    passed = (f"checks passed in {time.time() - started:.0f} s: Python, libpython, ldd, imports, "
              "CUDA, a JPEG decoded on cuda:0")  # fmt: skip
    log(passed)
    note_setup(options.out, passed)
    command = [sys.executable, "-m", "bench.gpu", *bench_args]
    if options.started is None:
        command += ["--started", repr(started)]
    return subprocess.run(command, cwd=ROOT, env=environment(site), check=False).returncode


RUN_EPILOG = (
    "run: every other argument goes to `python -m bench.gpu` (see its --help): --budget, the "
    "whole run's seconds from this runner's start; --out, where the rows (appended as each is "
    "measured), results.json and benchmarks.md go, by default $OUT/docs where the environment "
    "sets OUT (the folder a lent GPU machine returns), else docs/. The setup's outcome goes to "
    "<out>/benchmarks/gpu-setup.txt."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_bundle", allow_abbrev=False, epilog=RUN_EPILOG
    )
    parser.add_argument("action", choices=("stage", "run"))
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="the bundle's folder")
    args, rest = parser.parse_known_args(argv)
    if args.action == "run":
        return run(rest, args.bundle)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    manifest = stage(args.bundle)
    total = manifest["total_mib"]
    log(f"{args.bundle}: {manifest['bundle_mib']} MiB, with the repository {total} MiB "
        f"(limit {LIMIT_MIB} MiB)")  # fmt: skip
    return 0 if total <= LIMIT_MIB else 1


if __name__ == "__main__":
    raise SystemExit(main())
