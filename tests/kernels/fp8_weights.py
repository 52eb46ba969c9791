"""FP8 weights for the dense-kernel tests whose dequantisation is exact in bf16.

fast.Fp8Linear's CPU fallback dequantises w8 * scale to the activation dtype before a bf16 matmul, where the GPU path
(_scaled_mm, and these kernels) scales the fp32 accumulator. With power-of-two per-row scales (every row's absmax is
448 * 2^-k) w8 * scale is a bf16 number, so that fallback is the same arithmetic and the model comparisons can be tight.
"""

import torch

from dgemma.runtime.fast import Fp8Linear


def exact_fp8_linear(n: int, k: int, seed: int, exp: int = -9) -> Fp8Linear:
    g = torch.Generator().manual_seed(seed)
    w8 = (torch.randn(n, k, generator=g) * 64).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    w8[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = 448.0 * torch.sign(torch.randn(n, generator=g))
    row_exp = exp + torch.randint(-2, 3, (n, 1), generator=g).float()  # scales differ per row, all powers of two
    lin = Fp8Linear(w8 * torch.exp2(row_exp))
    assert torch.equal(lin.scale, torch.exp2(row_exp.squeeze(1)))  # 448 * 2^e / 448
    return lin


def fp8_linears(module, names, seed: int):
    """module in bf16, then each named nn.Linear replaced by an exact_fp8_linear of its shape."""
    module = module.to(torch.bfloat16)
    for i, name in enumerate(names):
        lin = getattr(module, name)
        if lin is not None:
            setattr(module, name, exact_fp8_linear(lin.out_features, lin.in_features, seed + i))
    return module


def exact_rows(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x with each row's absmax set to +-1.75 * 2^e (448 * 2^(e-8)): the per-row activation scale is a power of two
    and the CPU fallback's bf16 fake-quantised activations (q * s rounded to bf16) are exact too."""
    g = torch.Generator().manual_seed(seed)
    x2 = x.reshape(-1, x.shape[-1]).float().clone()
    e = torch.ceil(torch.log2(x2.abs().amax(-1) / 1.75))
    col = torch.randint(0, x2.shape[-1], (x2.shape[0],), generator=g)
    x2[torch.arange(x2.shape[0]), col] = 1.75 * torch.exp2(e) * torch.sign(torch.randn(x2.shape[0], generator=g))
    return x2.reshape(x.shape).to(x.dtype)
