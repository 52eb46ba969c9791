"""Fixtures shared by the unit tests of the in-flight batch and the serving scheduler."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """After the suite's 2-thread default: one thread, as the serving model runs (2 threads next to another busy
    process spin on this 2-core box: 9 s -> 200 s for the in-flight tests; tiny GEMMs are dominated by the thread
    hand-off anyway). The count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def graph_engine():
    """The embedded tiny model in fp32 behind the static passes (TorchGraphBackend), 256 tokens of KV: the backend
    the serving scheduler batches rows over."""
    from dgemma.runtime.factory import create

    torch.set_num_threads(1)
    return create("torch", "fp32", batched=True, dtype="float32", max_context=256)
