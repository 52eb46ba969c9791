"""Kernel tests run the Triton source under the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
when no GPU is visible, before any kernel module is imported); with a GPU they run compiled."""

import pytest

triton = pytest.importorskip("triton")

from . import aot_pool  # noqa: E402 - after the skip: aot_pool imports dgemma.kernels (triton)


@pytest.fixture(scope="session", autouse=True)
def gates_started(request):
    aot_pool.start_selected(request.session)  # the AOT compiles run beside the interpreted tests


@pytest.fixture(scope="module")
def aot_rows(request):
    """The AOT gate's rows of the test module's KERNEL_MODULE (started early by gates_started)."""
    return aot_pool.rows(request.module.KERNEL_MODULE)


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
