"""IEI_CUDA_GRAPHS: refused on a CPU host in one line; the replay logic (static buffers, padding
to the next captured size, the eager path for what no capture fits) with a stand-in for the CUDA
capture, since no GPU is at hand (the capture itself is torch's `torch.cuda.graph`)."""

from __future__ import annotations

import pytest
import torch
from fake_pb_utils import load_model_module

load_model_module()  # the stand-in for Triton's utils, and iei_runtime on sys.path

from iei_runtime import cuda_graphs, loading  # noqa: E402
from iei_runtime.settings import read_settings  # noqa: E402


def test_capture_sizes_are_powers_of_two_up_to_the_forward_batch():
    assert cuda_graphs.capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert cuda_graphs.capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert cuda_graphs.capture_sizes(1) == [1]


def stand_in_capture(run, inputs, pool):
    """What `torch.cuda.graph` records, replayed by calling `run` on the same static buffers
    into the same static output."""
    output = run(**inputs)

    def replay() -> None:
        output.copy_(run(**inputs))

    return cuda_graphs.Captured(inputs, output, replay)


def test_a_batch_replays_the_smallest_capture_that_holds_it_and_padding_is_dropped():
    weights = torch.randn(3, 5)
    calls = []

    def encoder(pixel_values: torch.Tensor) -> torch.Tensor:
        calls.append(len(pixel_values))
        return pixel_values.mean((2, 3)) @ weights  # each row's vector from its own row

    example = {"pixel_values": torch.zeros(1, 3, 2, 2)}
    runner = cuda_graphs.GraphedRunner(encoder, example, [1, 2, 4, 8], capture=stand_in_capture)
    assert sorted(runner.graphs) == [1, 2, 4, 8]
    calls.clear()
    for count in (1, 3, 8):
        batch = torch.randn(count, 3, 2, 2)
        vectors = runner(pixel_values=batch)
        torch.testing.assert_close(vectors, encoder(pixel_values=batch))
    assert calls[::2] == [1, 4, 8]  # replayed at 1, 4 (3 padded), 8
    assert runner.replays == 3
    stale = runner(pixel_values=torch.randn(3, 3, 2, 2))
    assert stale.data_ptr() != runner.graphs[4].output.data_ptr()  # a copy, not the buffer
    calls.clear()
    runner(pixel_values=torch.randn(9, 3, 2, 2))  # larger than every capture: eager
    runner(pixel_values=torch.randn(2, 3, 4, 4))  # another shape: eager
    assert calls == [9, 2] and runner.replays == 4


def test_cuda_graphs_on_a_cpu_host_stop_start_up_with_one_line(model_dirs):
    settings = read_settings(
        {},
        {"IMAGE_EMBEDDING_MODEL": str(model_dirs["vit"]), "IEI_CUDA_GRAPHS": "true",
         "IEI_ENGINE": "torch", "IEI_DTYPE": "float32"},
    )  # fmt: skip
    assert settings.cuda_graphs
    with pytest.raises(loading.ModelLoadError) as refused:
        loading.load_embedder(settings, torch.device("cpu"), threads=1)
    message = str(refused.value)
    assert "IEI_CUDA_GRAPHS=true: CUDA graphs need a GPU" in message and "\n" not in message
    with pytest.raises(ValueError, match="IEI_CUDA_GRAPHS='sometimes'"):
        read_settings({}, {"IEI_CUDA_GRAPHS": "sometimes"})
    assert not read_settings({}, {}).cuda_graphs  # off by default
