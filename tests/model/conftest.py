"""What every model test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """Torch's threads as they were before the test: a model load sets them (IEI_FORWARD_THREADS,
    measured or given), and the next test's load must not start from what this one chose."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
