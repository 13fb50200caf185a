"""What each extra model costs in memory: `iei serve` with one model, then with more (IEI_MODELS),
and the resident memory of every Triton Python stub (one process per model instance) by model.

    .venv/bin/python -m bench.model_memory [--full]

Builds tiny random models (tests/tiny_models.py) and, with --full, a full-size ViT-B/16 with random
weights (`ViTConfig()` defaults: the real model's cost). Prints, per Triton model, RSS and PSS (the
process's share of pages shared with others: torch's libraries are mapped by every stub) in MiB,
and tritonserver's own RSS. On a CPU only; GPU memory needs a GPU host (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from stack import Stack, descendants  # noqa: E402
from tiny_models import FAMILIES, build_tiny_model  # noqa: E402


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup if line.endswith("kB")}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def stub_memory(stack: Stack) -> tuple[dict[str, tuple[int, int]], int]:
    """Triton model -> summed (RSS, PSS) KiB of its stubs; tritonserver's RSS KiB."""
    assert stack.process is not None
    by_model: dict[str, tuple[int, int]] = {}
    server = 0
    for pid in descendants(stack.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"tritonserver"):
            server = memory_kib(pid)[0]
        elif command and command[0].endswith(b"triton_python_backend_stub"):
            model = Path(command[1].decode()).parent.parent.name
            rss, pss = memory_kib(pid)
            old = by_model.get(model, (0, 0))
            by_model[model] = (old[0] + rss, old[1] + pss)
    return by_model, server


def full_vit(folder: Path) -> Path:
    """ViT-B/16 at its real size with random weights, and the hub checkpoint's processor."""
    import json

    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig()).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(FAMILIES["vit"][1]))
    return folder


def report(title: str, stack: Stack) -> None:
    by_model, server = stub_memory(stack)
    print(f"\n{title}: tritonserver RSS {server / 1024:.0f} MiB")  # noqa: T201
    for model, (rss, pss) in sorted(by_model.items()):
        print(f"  {model:24} stubs RSS {rss / 1024:7.0f} MiB  PSS {pss / 1024:7.0f} MiB")  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="add a full-size random ViT-B/16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iei-memory-") as work:
        root = Path(work)
        models = {f: str(build_tiny_model(f, root / f)) for f in ("siglip", "dinov2", "vit")}
        if args.full:
            models["vit_b16"] = str(full_vit(root / "vit_b16"))
        env = {"IEI_DTYPE": "float32", "IEI_TRITON_INSTANCES": "1"}
        one = Stack(None, root / "one.log", models={"siglip": models["siglip"]}, **env).start()
        try:
            report("one model (siglip: iei + iei_text)", one)
        finally:
            one.stop()
        many = Stack(None, root / "many.log", models=models, **env).start(timeout=600)
        try:
            report(f"{len(models)} models ({', '.join(models)})", many)
        finally:
            many.stop()


if __name__ == "__main__":
    main()
