"""Fused OpenAI-Triton kernels of the denoising step, used by the fast CUDA backend (dgemma.runtime.fast).

One module per kernel: the `@triton.jit` kernel(s), a torch reference with the same arithmetic (the CPU path and
the tests' oracle), a launcher that picks its launch config from `configs` by GPU and batch, and the production
configs the ahead-of-time gate (`aot`) compiles for SM90, SM100 and SM120. Kernels run on CUDA tensors; on the CPU
they run under the Triton interpreter (`TRITON_INTERPRET=1`, set before triton is imported: the tests and `make
test` set it), which is how CI checks them. Layer: imports only dgemma.core and dgemma.model; the runtime imports it.
"""
