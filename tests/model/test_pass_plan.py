"""Forward passes cut to the sizes the CPU runs fastest (pass_plan.py): the choice of splits
from timings, the timing itself on a stand-in clock, the passes a batch runs as, and the model's
load measuring a plan only where IEI_FORWARD_BATCH_SIZE is `auto` on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_pb_utils import load_model_module

load_model_module()  # the stand-in for Triton's utils, and iei_runtime on sys.path

from iei_runtime import embedder as embedding  # noqa: E402
from iei_runtime import loading, pass_plan  # noqa: E402
from iei_runtime.settings import read_settings  # noqa: E402

# Seconds per pass of ViT-B/16 bf16 on a 2-core Xeon with AMX (2026-12-06): passes of 4 to 6
# images run slower per image than passes of 2, 3 or 8.
AMX_VIT_B = {1: 1 / 17.3, 2: 2 / 23.7, 3: 3 / 26.4, 4: 4 / 18.8, 5: 5 / 22.0, 6: 6 / 19.1,
             7: 7 / 23.5, 8: 8 / 32.1}  # fmt: skip


def test_sizes_slower_than_their_parts_are_split_into_them():
    assert pass_plan.fastest_splits(AMX_VIT_B) == {4: (2, 2), 5: (3, 2), 6: (3, 3)}


def test_a_cpu_whose_larger_passes_are_faster_keeps_every_pass_whole():
    steady = {size: 0.01 + 0.02 * size for size in range(1, 9)}  # a fixed cost per pass
    assert pass_plan.fastest_splits(steady) == {}


def test_a_split_must_beat_the_whole_pass_by_the_margin():
    # 4 as 2+2 is 5% faster: within timing noise, so 4 stays whole...
    table = {1: 1.0, 2: 1.9, 3: 3.0, 4: 4.0}
    assert pass_plan.fastest_splits(table) == {}
    # ...and taken when it is clearly faster.
    assert pass_plan.fastest_splits({**table, 4: 5.0}) == {4: (2, 2)}


def test_a_split_may_have_more_than_two_passes_and_their_sizes_add_up():
    # Only passes of 1 are fast: everything becomes passes of 1.
    plan = pass_plan.fastest_splits({1: 1.0, 2: 5.0, 3: 9.0, 4: 20.0})
    assert plan == {2: (1, 1), 3: (1, 1, 1), 4: (1, 1, 1, 1)}
    for size, parts in pass_plan.fastest_splits(AMX_VIT_B).items():
        assert sum(parts) == size and list(parts) == sorted(parts, reverse=True)


@pytest.mark.parametrize(
    ("count", "plan", "sizes"),
    [
        (3, {}, [3]),
        (20, {}, [8, 8, 4]),
        (20, {4: (2, 2)}, [8, 8, 2, 2]),
        (16, {8: (4, 4)}, [4, 4, 4, 4]),
        (5, {4: (2, 2)}, [5]),
    ],
)
def test_a_batch_runs_as_full_passes_then_the_rest_each_as_the_plan_splits_it(count, plan, sizes):
    assert pass_plan.pass_sizes(count, 8, plan) == sizes


class StandInClock:
    """time.perf_counter for pass_plan, advanced by each stand-in pass by its cost."""

    def __init__(self, cost, monkeypatch):
        self.now, self.cost, self.runs = 0.0, cost, []
        monkeypatch.setattr(pass_plan.time, "perf_counter", lambda: self.now)

    def run_pass(self, size: int) -> None:
        self.runs.append(size)
        self.now += self.cost(size, len(self.runs))


def test_timing_takes_each_size_the_least_of_its_rounds_in_turns(monkeypatch):
    # The machine is busy during the 13th to 16th pass (sizes 5 to 8 of the first timed round):
    # those timings are 10 times slower and the other rounds' count.
    clock = StandInClock(lambda size, run: AMX_VIT_B[size] * (10 if 14 <= run <= 17 else 1),
                         monkeypatch)  # fmt: skip
    plan, note = pass_plan.measured_plan(clock.run_pass, 8)
    assert clock.runs == [8] + [*range(1, 9)] * 4  # the estimate, untimed, then 3 rounds in turn
    assert plan == {4: (2, 2), 5: (3, 2), 6: (3, 3)}
    assert note.startswith("forward passes run 4 as 2+2, 5 as 3+2, 6 as 3+3 (img/s by pass:")
    assert "8:32.1" in note


def test_a_model_too_slow_to_time_within_the_budget_keeps_whole_passes(monkeypatch):
    clock = StandInClock(lambda size, run: 1.0 * size, monkeypatch)  # 8 s per pass of 8
    plan, note = pass_plan.measured_plan(clock.run_pass, 8)
    assert plan == {}
    assert clock.runs == [8]  # one pass to estimate, nothing more
    assert note == "forward passes whole (timing each size would take 144 s)"


def test_the_encoder_gets_the_planned_passes_and_the_vectors_stay_in_order():
    weights = torch.randn(12, 5)
    passes = []

    def encoder(pixel_values: torch.Tensor) -> torch.Tensor:
        passes.append(len(pixel_values))
        return pixel_values.flatten(1) @ weights  # each row's vector from its own row

    batch = {"pixel_values": torch.randn(13, 3, 2, 2)}
    options = {"device": torch.device("cpu"), "dtype": torch.float32, "forward_batch_size": 8}
    planned = embedding.run_encoder(encoder, batch, plan={5: (3, 2)}, **options)
    assert passes == [8, 3, 2]
    expected = batch["pixel_values"].flatten(1) @ weights
    torch.testing.assert_close(torch.from_numpy(planned), expected)


def load(model_dirs, monkeypatch, **environ):
    """The tiny ViT loaded as the model does, with a measured plan stood in for."""
    measured = []

    def stand_in(run_pass, largest):
        measured.append([len(run_pass(size)) for size in range(1, largest + 1)])
        return {2: (1, 1)}, "forward passes run 2 as 1+1 (stand-in)"

    monkeypatch.setattr(loading, "measured_plan", stand_in)
    settings = read_settings({}, {"IMAGE_EMBEDDING_MODEL": str(model_dirs["vit"]), **environ})
    return loading.load_embedder(settings, torch.device("cpu"), 1), measured


def test_auto_passes_on_a_cpu_are_measured_at_load_and_named_in_the_log_line(
    model_dirs, monkeypatch
):
    embedder, measured = load(model_dirs, monkeypatch)
    try:
        assert measured == [[1, 2, 3, 4, 5, 6, 7, 8]]  # every size, each a pass of its own
        assert embedder.pass_plan == {2: (1, 1)}
        assert loading.engine_line(embedder).endswith(", forward passes run 2 as 1+1 (stand-in)")
        info = loading.describe(embedder, read_settings({}, {}))
        assert '"forward_splits": {"2": [1, 1]}' in info
        vectors = embedder.forward(embedder.blank(2))  # as two passes of one
        embedder.pass_plan = {}
        np.testing.assert_allclose(vectors, embedder.forward(embedder.blank(2)), rtol=1e-5)
    finally:
        embedder.close()


def test_a_forward_batch_size_the_user_chose_is_kept_as_it_is(model_dirs, monkeypatch):
    embedder, measured = load(model_dirs, monkeypatch, IEI_FORWARD_BATCH_SIZE="4")
    try:
        assert measured == [] and embedder.pass_plan == {}
        assert "forward passes" not in loading.engine_line(embedder)
    finally:
        embedder.close()


# --- threads per pass ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("most", "counts"), [(16, [16, 8, 4, 2, 1]), (6, [6, 3, 1]), (2, [2, 1]), (1, [1])]
)
def test_thread_counts_tried_halve_down_to_one(most, counts):
    assert pass_plan.thread_counts(most) == counts


@pytest.mark.parametrize(
    ("seconds", "chosen"),
    [
        # Measured on a 2-core AMD EPYC (2026-12-06), a pass of 8: the tiny test ViT gains 6%
        # from a second thread, ViT-B/16 bf16 84%.
        ({1: 8 * 323e-6, 2: 8 * 305e-6}, 1),
        ({1: 8 * 0.2217, 2: 8 * 0.1203}, 2),
        # More cores than pay: 16 threads at 0.53, 8 at 0.71, 4 at 0.85.
        ({16: 0.2, 8: 0.3, 4: 0.5, 2: 0.9, 1: 1.7}, 4),
        ({1: 1.0}, 1),
    ],
)
def test_the_most_threads_that_pay_for_themselves_are_chosen(seconds, chosen):
    assert pass_plan.efficient_threads(seconds) == chosen


class StandInThreads(StandInClock):
    """A pass whose cost depends on the threads last set."""

    def __init__(self, cost, monkeypatch):
        super().__init__(lambda _size, _run: cost(self.threads), monkeypatch)
        self.threads, self.settings = 0, []

    def set_threads(self, count: int) -> None:
        self.threads = count
        self.settings.append(count)

    def run_full_pass(self) -> None:
        self.run_pass(self.threads)  # the runs record the threads each pass ran on


def test_threads_are_timed_in_turns_and_the_chosen_count_is_set(monkeypatch):
    # 4 cores: 4 threads are only 1.25x faster than 2, whose efficiency is 0.9.
    clock = StandInThreads(lambda threads: {4: 0.040, 2: 0.050, 1: 0.090}[threads], monkeypatch)
    chosen, note = pass_plan.measured_threads(clock.run_full_pass, clock.set_threads, 4)
    assert clock.runs == [4] + [4, 2, 1] * 4  # the estimate, then untimed and 3 rounds in turn
    assert chosen == 2 and clock.settings[-1] == 2
    assert note == "2 of 4 threads per pass (parallel efficiency: 4:0.56 2:0.90 1:1.00)"


def test_one_thread_or_a_model_too_slow_to_time_keeps_all_threads(monkeypatch):
    clock = StandInThreads(lambda threads: 4.0 / threads, monkeypatch)  # 2 s on 2 threads
    assert pass_plan.measured_threads(clock.run_full_pass, clock.set_threads, 1) == (1, "")
    assert clock.runs == []
    chosen, note = pass_plan.measured_threads(clock.run_full_pass, clock.set_threads, 2)
    assert (chosen, clock.runs, clock.threads) == (2, [2], 2)  # one pass to estimate, no more
    assert note == "2 threads per pass (timing fewer would take 24 s)"


def test_auto_threads_on_a_cpu_are_measured_at_load_and_named(model_dirs, monkeypatch):
    measured = []

    def stand_in(run_pass, set_threads, most):
        vectors = run_pass()
        measured.append((len(vectors), most))
        set_threads(1)
        return 1, "1 of 2 threads per pass (stand-in)"

    monkeypatch.setattr(loading, "measured_threads", stand_in)
    settings = read_settings({}, {"IMAGE_EMBEDDING_MODEL": str(model_dirs["vit"])})
    embedder = loading.load_embedder(settings, torch.device("cpu"), 2)
    try:
        assert measured == [(8, 2)]  # a full pass, up to the instance's cores
        assert embedder.forward_threads == 1 and torch.get_num_threads() == 1
        assert ", 1 of 2 threads per pass (stand-in)" in loading.engine_line(embedder)
        assert '"forward_threads": 1' in loading.describe(embedder, settings)
    finally:
        embedder.close()


def test_threads_the_user_chose_are_set_without_measuring(model_dirs, monkeypatch):
    monkeypatch.setattr(loading, "measured_threads", lambda *_: pytest.fail("measured"))
    environ = {"IMAGE_EMBEDDING_MODEL": str(model_dirs["vit"]), "IEI_FORWARD_THREADS": "1"}
    embedder = loading.load_embedder(read_settings({}, environ), torch.device("cpu"), 2)
    try:
        assert embedder.forward_threads == 1 and torch.get_num_threads() == 1
        assert "threads per pass: 1 (IEI_FORWARD_THREADS)" in loading.engine_line(embedder)
    finally:
        embedder.close()


def test_a_text_models_threads_are_measured_on_a_full_pass_of_captions(model_dirs, monkeypatch):
    measured = []

    def stand_in(run_pass, set_threads, most):
        measured.append((len(run_pass()), most))
        return most, f"{most} of {most} threads per pass (stand-in)"

    monkeypatch.setattr(loading, "measured_threads", stand_in)
    torch.set_num_threads(2)
    settings = read_settings({}, {"IMAGE_EMBEDDING_MODEL": str(model_dirs["clip"])})
    embedder = loading.load_text_embedder(settings, torch.device("cpu"))
    assert measured == [(8, 2)]  # forward_batch_size texts, up to the process's threads
    assert (embedder.forward_threads, torch.get_num_threads()) == (2, 2)
    assert loading.engine_line(embedder).endswith(", 2 of 2 threads per pass (stand-in)")
    chosen = read_settings({}, {"IMAGE_EMBEDDING_MODEL": str(model_dirs["clip"]),
                                "IEI_FORWARD_THREADS": "1"})  # fmt: skip
    embedder = loading.load_text_embedder(chosen, torch.device("cpu"))
    assert measured == [(8, 2)]  # not measured again: the count is the user's
    assert (embedder.forward_threads, torch.get_num_threads()) == (1, 1)
    assert loading.engine_line(embedder).endswith(", threads per pass: 1 (IEI_FORWARD_THREADS)")


@pytest.mark.parametrize("environ", [None, ""])  # unset, or set empty
def test_a_ray_actor_runs_its_passes_on_all_its_threads(model_dirs, monkeypatch, environ):
    # An actor decodes, then runs the pass: a thread the pass left out would idle.
    pytest.importorskip("pyarrow")  # iei.ray's
    from iei.ray.actors import ModelEmbedder

    if environ is None:
        monkeypatch.delenv("IEI_FORWARD_THREADS", raising=False)
    else:
        monkeypatch.setenv("IEI_FORWARD_THREADS", environ)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU actor
    monkeypatch.setattr(loading, "measured_threads", lambda *_: pytest.fail("measured"))
    actor = ModelEmbedder(str(model_dirs["vit"]), threads=2)
    try:
        assert actor.embedder.forward_threads == 2 and torch.get_num_threads() == 2
    finally:
        actor.embedder.close()


def test_loads_time_their_passes_one_after_the_other(tmp_path):
    lock = tmp_path / "timing.lock"
    with pass_plan.timing_alone(lock) as first:
        assert first
        with pass_plan.timing_alone(lock, wait=0.2) as second:
            assert not second  # another load is timing: after the wait, on without it
    with pass_plan.timing_alone(lock, wait=0.2) as third:
        assert third
