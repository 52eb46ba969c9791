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
    """Compute capability x10 of a CUDA device; 90 (the Hopper tables) for CPU tensors under the interpreter."""
    if torch.device(device).type != "cuda":
        return 90
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
def quant_e4m3(x, inv_scale, EMU: tl.constexpr):
    """x * inv_scale, saturated to the e4m3 range, rounded to e4m3."""
    return to_e4m3(tl.minimum(tl.maximum(x * inv_scale, -448.0), 448.0), EMU)


@triton.jit
def row_scale(amax):
    """fast._quant_rows_eager's dequantisation scale: clamp(absmax, 1e-12) / 448 (IEEE division)."""
    return tl.div_rn(tl.maximum(amax, 1e-12), 448.0)


@triton.jit
def gelu_tanh(x):
    """torch's gelu(approximate='tanh') in fp32; tanh from exp2 (no libdevice under the interpreter)."""
    y = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    y = tl.minimum(tl.maximum(y, -15.0), 15.0)  # tanh(15) is 1.0 in fp32; keeps exp2 finite
    t = 1.0 - 2.0 / (tl.exp2(y * 2.8853900817779268) + 1.0)
    return 0.5 * x * (1.0 + t)


# -- torch twins (the references' arithmetic) ---------------------------------------------------------------------
def bf16r(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest bf16 value, kept in fp32."""
    return x.float().to(torch.bfloat16).float()


def quant_rows_ref(x: torch.Tensor, reciprocal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fast._quant_rows_eager's arithmetic: per-row absmax / 448, x / s saturated to e4m3.

    reciprocal=True multiplies by 1/s instead of dividing (what the GEMM prologues do: one division per row, not per
    element); the two differ only where x/s lies within an fp32 ulp of an e4m3 rounding midpoint."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / E4M3_MAX
    y = xf * (1.0 / s) if reciprocal else xf / s
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """model.Ops.rms_norm's arithmetic (fp32, x * (mean(x^2) + eps)^-0.5 * weight, one bf16 rounding), with the
    kernels' correctly rounded 1/sqrt for the -0.5 power (torch's CPU pow/rsqrt differs from it in the last bit of
    13% of inputs, CUDA's rsqrtf by up to 2 ulp: neither is reproducible across devices)."""
    xf = x.float()
    y = xf * (1.0 / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    if weight is not None:
        y = y * weight.float()
    return bf16r(y)
