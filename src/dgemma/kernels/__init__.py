"""Fused OpenAI-Triton kernels of the denoising step, used by the fast CUDA backend (dgemma.runtime.fast).

One module per kernel: the `@triton.jit` kernel(s), a torch reference with the same arithmetic (the CPU path and
the tests' oracle), a launcher that picks its launch config from `configs` by GPU and batch, and the production
configs the ahead-of-time gate (`aot`) compiles for SM90, SM100 and SM120. Kernels run on CUDA tensors; on the CPU
they run under the Triton interpreter (`TRITON_INTERPRET=1`, set before triton is imported: the tests and `make
test` set it), which is how CI checks them. Layer: imports only dgemma.core and dgemma.model; the runtime imports it.

Shared conventions, each with one home: `numerics` holds every rounding / activation helper (bf16 and e4m3 round to
nearest even, GELU(tanh), tanh, the interpreter switch, the compute capability; E4M3_MAX is model.lowp's). Alignment
is never a kernel's own business: the AOT gate compiles each spec with the JIT's divisibility attributes for aligned
pointers and the integer arguments the spec names (`aot.spec_attrs`), so no kernel carries tl.multiple_of hints
behind launcher checks or an ALIGNED flag; TMA descriptors carry their alignment in their type.
"""
