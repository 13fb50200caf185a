"""CUDA graphs for the torch engine on a GPU (IEI_CUDA_GRAPHS=true): the image encoder's forward
pass captured once per batch size, then replayed, so that a pass costs one launch instead of the
CPU time of launching each of its kernels (ViT-B/16: a few hundred).

Captured at start at the powers of two up to the forward batch size (and that size itself), in the
input shape of the processor's output; a batch is padded with rows of zeros up to the next
captured size (each row's vector depends on its own row only: pooling is per image), and the
padding's vectors are dropped. A batch larger than every capture, or of another shape, runs the
encoder as usual. Off by default: whether it pays is measured on a GPU (`make bench-gpu`); on a
CPU host it is refused at start, in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Runner = Callable[..., torch.Tensor]


class CudaGraphsError(ValueError):
    """IEI_CUDA_GRAPHS asked for where it cannot run: one line."""


def capture_sizes(forward_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to `forward_batch_size`, and that size itself."""
    sizes, size = [], 1
    while size < forward_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, forward_batch_size]


@dataclass
class Captured:
    """One batch size's graph: its static input buffers and output, and how to replay it."""

    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    replay: Callable[[], None]


def cuda_capture(run: Runner, inputs: dict[str, torch.Tensor], pool: Any) -> Captured:
    """`run(**inputs)` captured as a CUDA graph (warmed up on a side stream first, as torch's
    documentation prescribes); `pool` shares memory between the captures."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(2):
            run(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
        output = run(**inputs)
    return Captured(inputs, output, graph.replay)


class GraphedRunner:
    """Called as the encoder is (keyword tensors on the device, in the model's dtype; (N, D)
    out): replays the capture of the smallest captured size that holds the batch."""

    def __init__(
        self,
        run: Runner,
        example: dict[str, torch.Tensor],
        sizes: Sequence[int],
        capture: Callable[[Runner, dict[str, torch.Tensor], Any], Captured] = cuda_capture,
        pool: Any = None,
    ) -> None:
        """`example`: one input of each name, (1, ...) on the device in the model's dtype."""
        self.run = run
        self.shapes = {name: tuple(t.shape[1:]) for name, t in example.items()}
        self.graphs: dict[int, Captured] = {}
        for size in sorted(sizes, reverse=True):  # the largest first: the pool fits the rest
            inputs = {
                name: torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=t.device)
                for name, t in example.items()
            }
            self.graphs[size] = capture(run, inputs, pool)
        self.replays = 0  # batches served by a replay (the rest ran eagerly)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        count = len(next(iter(inputs.values())))
        fits = [size for size in self.graphs if size >= count]
        same = {name: tuple(t.shape[1:]) for name, t in inputs.items()} == self.shapes
        if not fits or not same:
            return self.run(**inputs)
        captured = self.graphs[min(fits)]
        for name, tensor in inputs.items():
            static = captured.inputs[name]
            static[:count].copy_(tensor)
            static[count:].zero_()
        captured.replay()
        self.replays += 1
        return captured.output[:count].clone()  # the next replay overwrites the static output

    def describe(self) -> str:
        return f"CUDA graphs at batch sizes {', '.join(map(str, sorted(self.graphs)))}"


def graphed(
    run: Runner, example: dict[str, torch.Tensor], device: torch.device, forward_batch_size: int
) -> GraphedRunner:
    """`run` replayed from CUDA graphs on `device`, or the one line why it cannot be."""
    if device.type != "cuda":
        raise refusal(device)
    pool = torch.cuda.graph_pool_handle()
    return GraphedRunner(run, example, capture_sizes(forward_batch_size), pool=pool)


def refusal(device: torch.device) -> CudaGraphsError:
    return CudaGraphsError(
        f"IEI_CUDA_GRAPHS=true: CUDA graphs need a GPU, and this instance runs on {device} "
        "(IEI_CUDA_GRAPHS=false serves it)"
    )
