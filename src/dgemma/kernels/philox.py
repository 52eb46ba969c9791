"""Counter-based random numbers of the fused sampler, in Triton and as a torch twin with the same arithmetic.

Philox4x32-10 (Triton's `tl.philox`, first output word) keyed by a per-request 64-bit seed. The counter of one draw
is (c0, c1, c2, c3) = (vocabulary id or canvas position, canvas position, the request's step counter, stream), so a
draw depends only on the request's seed and step counter and on which token/position it is for: not on the batch
slot, the launch grid or the tile sizes. The step counter lives on the device (`rng[b] = (seed, counter)`, int64) and
is advanced by the canvas-step kernel, so no step needs a host value.

Streams: GUMBEL (the exponential race of the sampled token, one draw per (position, vocabulary id)), RENOISE (the
uniform token of a rejected position) and INIT (the first canvas).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GUMBEL, RENOISE, INIT = 0, 1, 2
K_GUMBEL, K_RENOISE, K_INIT = tl.constexpr(GUMBEL), tl.constexpr(RENOISE), tl.constexpr(INIT)  # for kernels
_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B, _ROUND_A, _ROUND_B = 0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57
TWO_M32 = 2.3283064365386963e-10  # 2**-32


@triton.jit
def draw_u32(seed, c0, c1, c2, c3):
    """Philox4x32-10 first word for counters of one shape (uint32 blocks) under a (broadcastable) int64 seed."""
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return r


@triton.jit
def exponential(r):
    """uint32 -> an Exp(1) variate E = -log(1 - v), v = (r + 1/2) 2^-32 in (0, 1].

    Below v = 2^-5, -log(1 - v) is the series v + v^2/2 + ... + v^5/5 (relative error < 1e-8): the small E, the ones
    that win the race for low-probability tokens, keep full fp32 precision down to 2^-33. v rounds to 1.0 for the top
    ~2^-25 of the range: E = inf there, i.e. that id cannot win that one draw (a 3e-8 relative bias)."""
    v = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    small = v * (1.0 + v * (0.5 + v * (0.3333333432674408 + v * (0.25 + v * 0.20000000298023224))))
    return tl.where(v < 0.03125, small, -tl.log(1.0 - v))


@triton.jit
def uniform_index(r, n):
    """uint32 -> an integer in [0, n) (int64) by multiply-shift: floor(r * n / 2^32), bias <= n / 2^32."""
    return ((r.to(tl.uint64) * n) >> 32).to(tl.int64)


# -- torch twin ---------------------------------------------------------------------------------------------------
def _mulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    return ((b * a) >> 32) & _M32  # the int64 product wraps but keeps its low 64 bits: bits 32..63 are the high word


def philox4_ref(seed, c0, c1, c2, c3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 exactly as tl.philox computes it; int64 tensors (broadcast) holding uint32 values."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _M32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        p0, p2 = c0, c2
        c0 = _mulhi(_ROUND_B, p2) ^ c1 ^ k0
        c2 = _mulhi(_ROUND_A, p0) ^ c3 ^ k1
        c1 = (p2 * _ROUND_B) & _M32
        c3 = (p0 * _ROUND_A) & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_ref(seed, c0, c1, c2, c3) -> torch.Tensor:
    """First word of `philox4_ref` (what tl.randint returns)."""
    return philox4_ref(seed, c0, c1, c2, c3)[0]


def exponential_ref(r: torch.Tensor) -> torch.Tensor:
    """`exponential` in torch (fp32, same operation order)."""
    v = (r.to(torch.float32) + 0.5) * TWO_M32
    small = v * (1.0 + v * (0.5 + v * (0.3333333432674408 + v * (0.25 + v * 0.20000000298023224))))
    return torch.where(v < 0.03125, small, -torch.log(1.0 - v))


def uniform_index_ref(r: torch.Tensor, n: int) -> torch.Tensor:
    return (r * n) >> 32
