"""The served image path's CPU per image, this checkout against another, in one run.

    git worktree add /tmp/before <rev>          # or any checkout of IEI
    .venv/bin/python -m bench.ab --against /tmp/before

A change to the image path (a check per image, a copy less) moves the stack's CPU per image by a
few per cent, which this machine's drift between runs hides: `make bench`'s tables of two runs
cannot show it. Here two stacks run side by side, this checkout's and `--against`'s (its
frontend on PYTHONPATH, its model repository as IEI_MODEL_REPOSITORY; the launcher is this
checkout's, so a checkout from before a setting existed may not run), both serving a tiny ViT
(the forward pass nearly free), and take issue 19's loads in alternating rounds: web JPEGs and
12 MP phone photos, 16 concurrent single-image uploads (the file as the body) and 64-image
multipart forms. The CPU per image is every process under `iei serve`'s (`measure.cpu_by_role`,
the load generator left out); per load the median of the rounds after the first (a warm-up) is
compared.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from . import measure
from .__main__ import LARGE_BODIES, PHOTO_SETS
from .workload import ServedStack, build_model, make_jpegs

# (photos, concurrency, requests, images per request, body)
LOADS = (
    ("web", 16, 640, 1, "raw"),
    ("web", 1, 8, 64, "form"),
    ("phone", 16, 160, 1, "raw"),
    ("phone", 1, 4, 64, "form"),
)


def log(message: str) -> None:
    print(f"[bench.ab] {message}", file=sys.stderr, flush=True)  # noqa: T201


def checkout_environ(checkout: Path) -> dict[str, str]:
    """What makes a stack run `checkout`'s frontend and model code."""
    frontend, repository = checkout / "frontend", checkout / "model_repository"
    for needed in (frontend / "iei", repository / "iei"):
        if not needed.is_dir():
            raise SystemExit(f"--against {checkout}: no {needed.relative_to(checkout)} there")
    return {"PYTHONPATH": str(frontend), "IEI_MODEL_REPOSITORY": str(repository)}


async def stack_cpu_us(stack: ServedStack, files: list[bytes], load: tuple) -> float:
    """One load on `stack`: the CPU time of the processes under `iei serve` per image sent."""
    _, concurrency, requests, per_request, body = load
    assert stack.process is not None
    before = measure.cpu_by_role(stack.process.pid)
    done = await measure.http_load(
        stack.url, files, concurrency=concurrency, requests=requests, per_request=per_request,
        body=body,
    )  # fmt: skip
    after = measure.cpu_by_role(stack.process.pid)
    cpu = measure.cpu_per_image(before, after, done.sent)
    return sum(us for role, us in cpu.items() if role != "client")


def compared(rounds: dict[tuple[tuple, str], list[float]]) -> list[str]:
    """A line per load: the median of each side's rounds and their ratio, this checkout's over
    the other's, with every round's figure."""
    lines = []
    for load in dict.fromkeys(load for load, _ in rounds):
        this, other = rounds[(load, "this")], rounds[(load, "against")]
        ratio = statistics.median(this) / statistics.median(other)
        photos, concurrency, _, per_request, body = load
        lines.append(
            f"{photos} x{per_request} c={concurrency} ({body}): this "
            f"{statistics.median(this):.0f} us/image, against {statistics.median(other):.0f}, "
            f"ratio {ratio:.3f} (rounds: this {[round(x) for x in this]}, against "
            f"{[round(x) for x in other]})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("--against", type=Path, required=True, help="another checkout of IEI")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first a warm-up")
    args = parser.parse_args(argv)
    other = checkout_environ(args.against.resolve())
    # This checkout's stack is started the same way: one started from the installed package and
    # the shipped repository cost 4-12 % more CPU per image than the same code given by path
    # (an A/A run, `--against` a worktree of HEAD).
    own = checkout_environ(Path(__file__).resolve().parents[1])
    rounds: dict[tuple[tuple, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="iei-bench-ab-") as tmp:
        work = Path(tmp)
        model = build_model("vit-tiny", work / "vit-tiny")
        photos = {name: make_jpegs(size) for name, size in PHOTO_SETS.items()}
        with (
            ServedStack(model, work / "this.log", **own, **LARGE_BODIES) as this,
            ServedStack(model, work / "against.log", **other, **LARGE_BODIES) as against,
        ):
            sides = [("this", this), ("against", against)]
            for number in range(args.rounds):
                for side, stack in sides if number % 2 == 0 else sides[::-1]:
                    for load in LOADS:
                        us = asyncio.run(stack_cpu_us(stack, photos[load[0]], load))
                        log(f"round {number} {side} {load}: {us:.0f} us/image")
                        if number:
                            rounds.setdefault((load, side), []).append(us)
    for line in compared(rounds):
        print(line, flush=True)  # noqa: T201 (the result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
