"""Rounding and activation helpers shared by the dense-path kernels (norm_quant, fp8_gemm, qkv, residual_norm),
as `@triton.jit` functions with their torch twins.

The kernels reproduce the model's bf16 tensor boundaries (fp32 arithmetic, rounded to bf16 where the eager model
materialises a bf16 tensor) and fast._quant_rows_eager's per-row e4m3 quantisation. Compiled, a `.to(bfloat16)` /
`.to(float8e4nv)` is a round-to-nearest-even conversion (cvt.rn / cvt.rn.satfinite). The Triton interpreter's casts are
not: fp32 -> bf16 truncates and fp32 -> e4m3 rounds half up with a carry bug. `EMU=True` (what every launcher passes
under TRITON_INTERPRET) rounds with integer arithmetic instead, so the CPU tests see the GPU's rounding bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12  # fast._quant_rows_eager clamps the row absmax to this before dividing by 448


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_cc(device) -> int:
    """Compute capability x10 of a CUDA device; 0 for CPU tensors (the interpreter: configs' family 0, else Hopper)."""
    if torch.device(device).type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@triton.jit
def round_bf16(x, EMU: tl.constexpr):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32."""
    if EMU:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def to_e4m3(x, EMU: tl.constexpr):
    """fp32 already clamped to [-448, 448] -> float8e4nv, round to nearest even."""
    if EMU:
        b = x.to(tl.uint32, bitcast=True)
        normal = (((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
        # subnormals (|x| < 2^-6) are multiples of 2^-9: round x*512 to an integer with the 1.5*2^23 trick
        sub = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        return tl.where(tl.abs(x) < 0.015625, sub, normal).to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def quant_e4m3(x, s, inv_s, EMU: tl.constexpr):
    """e4m3(clamp(x / s)) with the IEEE quotient torch computes, without a division per element: q0 = x * (1/s), then
    one Markstein correction q0 + fma(-q0, s, x) * (1/s), which is the correctly rounded x / s when 1/s is (checked
    against torch's division in tests/kernels/test_fp8_gemm.py). The interpreter's fma rounds twice, so there
    (EMU) the division is done directly."""
    if EMU:
        y = tl.div_rn(x, s)
    else:
        q0 = x * inv_s
        y = tl.fma(tl.fma(-q0, s, x), inv_s, q0)
    return to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), EMU)


@triton.jit
def row_scale(amax):
    """fast._quant_rows_eager's dequantisation scale: clamp(absmax, 1e-12) / 448 (IEEE division)."""
    return tl.div_rn(tl.maximum(amax, 1e-12), 448.0)


@triton.jit
def gelu_tanh(x):
    """torch's gelu(approximate='tanh') in fp32, as x * sigmoid(2u) = 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) *
    (x + 0.044715 x^3): exp2 only (no libdevice under the interpreter), and no cancellation of 1 + tanh(u) for
    u << 0, where torch's fp32 value is off by up to ~3e-8 * |x| (the two agree to a bf16 rounding step elsewhere)."""
    u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    u = tl.minimum(tl.maximum(u, -40.0), 40.0)  # keeps exp2 finite; sigmoid(+-80) is 1 / ~0 in fp32
    return x / (1.0 + tl.exp2(u * -2.8853900817779268))


# -- torch twins (the references' arithmetic) ---------------------------------------------------------------------
def bf16r(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest bf16 value, kept in fp32."""
    return x.float().to(torch.bfloat16).float()


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """The kernels' gelu_tanh in torch (fp32)."""
    x = x.float()
    u = (0.7978845608028654 * (x + 0.044715 * (x * x * x))).clamp(-40.0, 40.0)
    return x / (1.0 + torch.exp2(u * -2.8853900817779268))


def quant_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fast._quant_rows_eager's arithmetic: per-row absmax / 448, x / s saturated to e4m3."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (xf / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


def markstein_div_ref(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """quant_e4m3's compiled quotient in torch: fp32 ops, the two fmas evaluated exactly in fp64 (the products of
    fp32 numbers are exact there) and rounded once to fp32, as fma.rn.f32 does."""
    x, s = x.float(), s.float()
    inv = 1.0 / s
    q0 = x * inv
    r = (x.double() - q0.double() * s.double()).float()
    return (q0.double() + r.double() * inv.double()).float()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """model.Ops.rms_norm's arithmetic (fp32, x * (mean(x^2) + eps)^-0.5 * weight, one bf16 rounding), with the
    kernels' correctly rounded 1/sqrt for the -0.5 power (torch's CPU pow/rsqrt differs from it in the last bit of
    13% of inputs, CUDA's rsqrtf by up to 2 ulp: neither is reproducible across devices)."""
    xf = x.float()
    y = xf * (1.0 / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    if weight is not None:
        y = y * weight.float()
    return bf16r(y)
