"""Kernel tests run the Triton source under the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
when no GPU is visible, before any kernel module is imported); with a GPU they run compiled."""

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture
def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def poison(t):
    """Fill an output buffer with NaN (floats) or a sentinel (ints) so an unwritten element fails the test."""
    return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the MoE launchers (dgemma.kernels.moe.empty) allocate starts poisoned: NaN, 0x7F (e4m3 NaN), -7."""
    import torch

    from dgemma.kernels import moe

    def empty(*shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.view(torch.uint8).fill_(0x7F).view(dtype) if dtype == torch.float8_e4m3fn else poison(t)

    monkeypatch.setattr(moe, "empty", empty)
