"""Forward passes cut to the sizes this CPU runs fastest, on the threads that pay.

A CPU's matrix kernels are not equally fast at every batch size. On an Intel Xeon with AMX
(oneDNN's bf16 brgemm, 2 cores), ViT-B/16 runs passes of 4 to 6 images about 30% slower per
image than passes of 2, 3 or 8: its linear layers fall off a cliff for 768 to 1,400 rows. The
dynamic batcher forms executions of about 4 images under 8 concurrent single-image requests, so
served single images ran at 0.6 to 0.8 of the forward pass's limit. Timing passes of every
size up to `IEI_FORWARD_BATCH_SIZE` at load, and splitting a size only where its parts are
clearly faster, removes that cost wherever it exists and changes nothing elsewhere.

The threads of a pass are measured the same way (`IEI_FORWARD_THREADS=auto`): a small model's
pass gains little from a second thread and pays for it in CPU time the rest of the server needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

# A split is taken only when its parts are measured this much faster than the whole pass: timing
# noise must not cut passes that are as fast whole (each pass has a fixed cost of its own).
SPLIT_MARGIN = 0.9
# The longest a model's load may spend timing passes; a model slower than that keeps whole passes
# (ViT-B/16 bf16 on a 2-core AMX Xeon takes about 5 s; its float32 on a 2-core EPYC would take
# about 25 s, and its passes measured alike at every size there).
MEASURE_BUDGET_S = 15.0
TIMING_ROUNDS = 3

Plan = dict[int, tuple[int, ...]]  # images in a pass -> the passes it runs as (only splits)
# Models that load at once (Triton loads `iei` and `iei_text` in parallel, each instance with all
# its cores) time their passes one after the other: timings taken side by side would share the
# cores and read every thread count too slow. A load waits at most this long for the others.
TIMING_LOCK = Path(tempfile.gettempdir()) / "iei-pass-timing.lock"
TIMING_LOCK_WAIT_S = 2 * MEASURE_BUDGET_S + 30.0


@contextlib.contextmanager
def timing_alone(path: Path = TIMING_LOCK, wait: float = TIMING_LOCK_WAIT_S) -> Iterator[bool]:
    """Hold the machine's timing lock (an flock, released when the process ends) for the block;
    True if it was had within `wait` seconds, else the block runs without it."""
    try:
        handle = open(path, "a+b")  # noqa: SIM115 (held for the block)
    except OSError:
        yield False
        return
    with handle:
        deadline = time.monotonic() + wait
        held = False
        while not held:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except OSError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def pass_sizes(count: int, largest: int, plan: Mapping[int, tuple[int, ...]]) -> list[int]:
    """The passes `count` rows run as: passes of `largest`, then the remainder, each as `plan`
    splits it (whole where it has no entry)."""
    sizes = list(plan.get(largest, (largest,))) * (count // largest)
    rest = count % largest
    if rest:
        sizes.extend(plan.get(rest, (rest,)))
    return sizes


def fastest_splits(seconds: Mapping[int, float], margin: float = SPLIT_MARGIN) -> Plan:
    """From the measured seconds of one pass of each size 1..n, the sizes better run as several
    smaller passes, and those passes (largest first). A split counts only when it is faster
    than `margin` times the whole pass."""
    best: dict[int, tuple[float, tuple[int, ...]]] = {}
    for size in sorted(seconds):
        whole = (seconds[size], (size,))
        parts = [
            (best[first][0] + best[size - first][0], best[first][1] + best[size - first][1])
            for first in range(1, size)
            if first in best and size - first in best
        ]
        split = min(parts, default=None)
        best[size] = split if split is not None and split[0] < margin * whole[0] else whole
    return {size: tuple(sorted(parts, reverse=True)) for size, (_, parts) in best.items()
            if len(parts) > 1}  # fmt: skip


def time_passes(
    run_pass: Callable[[int], object],
    keys: Sequence[int],
    rounds: int,
    prepare: Callable[[int], object] = lambda _key: None,
) -> dict[int, float]:
    """Seconds of `run_pass(key)` for each key (a pass size, or a thread count that `prepare`
    sets before each pass, untimed): the least of `rounds` timings, taken in turns over the keys
    (a moment of other work on the machine then slows one timing of several keys, not every
    timing of one), after one untimed pass of each (the first pass of a size also builds its
    kernels)."""
    for key in keys:
        prepare(key)
        run_pass(key)
    seconds: dict[int, float] = {}
    for _ in range(rounds):
        for key in keys:
            prepare(key)
            start = time.perf_counter()
            run_pass(key)
            elapsed = time.perf_counter() - start
            seconds[key] = min(seconds.get(key, elapsed), elapsed)
    return seconds


def measured_plan(
    run_pass: Callable[[int], object],
    largest: int,
    budget: float = MEASURE_BUDGET_S,
    rounds: int = TIMING_ROUNDS,
) -> tuple[Plan, str]:
    """Time passes of every size up to `largest`: the splits worth taking, and a line for the
    model's log. None when one full pass shows that timing them all would take longer than
    `budget` seconds."""
    start = time.perf_counter()
    run_pass(largest)
    # Every size once untimed and `rounds` times timed: (rounds + 1) x (1 + ... + largest) images.
    estimate = (time.perf_counter() - start) * (rounds + 1) * (largest + 1) / 2
    if estimate > budget:
        return {}, f"forward passes whole (timing each size would take {estimate:.0f} s)"
    seconds = time_passes(run_pass, range(1, largest + 1), rounds)
    plan = fastest_splits(seconds)
    rates = " ".join(f"{size}:{size / s:.1f}" for size, s in seconds.items())
    splits = ", ".join(f"{size} as {'+'.join(map(str, parts))}" for size, parts in plan.items())
    return plan, f"forward passes {'run ' + splits if plan else 'whole'} (img/s by pass: {rates})"


# --- threads per pass ---------------------------------------------------------------------------

# A pass runs on fewer threads where the others are measured to add little: below this parallel
# efficiency (one thread's time over k x the time on k threads) the extra threads mostly spin and
# wait, CPU time that the decode threads, Triton and the frontend need when the server is busy.
# On a 2-core AMD EPYC: the tiny test ViT at 8 images 0.53 (2 threads cost 1.9x the CPU for 1.05x
# the speed), ViT-B/16 bf16 0.92.
THREAD_EFFICIENCY = 0.75


def thread_counts(most: int) -> list[int]:
    """The thread counts tried: `most`, then halving down to 1 (16: 16, 8, 4, 2, 1)."""
    counts = [most]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


def efficient_threads(seconds: Mapping[int, float], least: float = THREAD_EFFICIENCY) -> int:
    """From the measured seconds of one pass on each thread count (1 among them), the most
    threads whose parallel efficiency is at least `least`."""
    alone = seconds[1]
    return max(k for k, s in seconds.items() if k == 1 or alone / (k * s) >= least)


def measured_threads(
    run_pass: Callable[[], object],
    set_threads: Callable[[int], None],
    most: int,
    budget: float = MEASURE_BUDGET_S,
    rounds: int = TIMING_ROUNDS,
) -> tuple[int, str]:
    """Time one pass on `most` threads and on fewer (thread_counts): the count it runs on from
    now on (set), and a line for the model's log. `most` when one pass shows that timing them
    would take longer than `budget` seconds."""
    if most <= 1:
        return most, ""
    counts = thread_counts(most)
    set_threads(most)
    start = time.perf_counter()
    run_pass()
    # A pass on k threads takes at most `most / k` times one on all of them (perfect scaling).
    estimate = (time.perf_counter() - start) * (rounds + 1) * sum(most / k for k in counts)
    if estimate > budget:
        return most, f"{most} threads per pass (timing fewer would take {estimate:.0f} s)"
    seconds = time_passes(lambda _threads: run_pass(), counts, rounds, prepare=set_threads)
    chosen = efficient_threads(seconds)
    set_threads(chosen)
    efficiency = " ".join(f"{k}:{seconds[1] / (k * s):.2f}" for k, s in seconds.items())
    return chosen, f"{chosen} of {most} threads per pass (parallel efficiency: {efficiency})"
