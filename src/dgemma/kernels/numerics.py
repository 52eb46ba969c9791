"""THE numeric helpers of every kernel module: bf16 / e4m3 rounding, GELU(tanh) and tanh as `@triton.jit` functions
with their torch twins, the interpreter switch and the compute-capability lookup. One home per helper.

The kernels reproduce the model's bf16 tensor boundaries (fp32 arithmetic, rounded to bf16 where the eager model
materialises a bf16 tensor) and model.lowp.fp8_quantize_rows' per-row e4m3 quantisation. Compiled, a `.to(bfloat16)`
/ `.to(float8e4nv)` is a round-to-nearest-even conversion (cvt.rn / cvt.rn.satfinite). The Triton interpreter's casts
are not: fp32 -> bf16 truncates and fp32 -> e4m3 rounds half up with a carry bug. `EMU=True` (what every launcher
passes under TRITON_INTERPRET) rounds with integer arithmetic instead, so the CPU tests see the GPU's rounding bit for
bit. E4M3_MAX is model.lowp's; `E4M3_MAX_C` is the same value as a tl.constexpr for @triton.jit code.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..model.lowp import E4M3_MAX, fp8_quantize_rows

E4M3_MAX_C = tl.constexpr(E4M3_MAX)
AMAX_FLOOR = 1e-12  # fp8_quantize_rows clamps the row absmax to this before dividing by 448


def interpreting() -> bool:
    """TRITON_INTERPRET is on: kernels run on CPU tensors in the interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_cc(device) -> int:
    """Compute capability x10 of a CUDA device; 0 for CPU tensors (the interpreter: configs' family 0, else Hopper)."""
    if torch.device(device).type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# -- bf16 ---------------------------------------------------------------------------------------------------------
@triton.jit
def bf16_rne(x):
    """fp32 -> the fp32 value of bf16(x), round to nearest even, in integer arithmetic (valid compiled and
    interpreted; kernels that never cast use it directly)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x, EMU: tl.constexpr):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32."""
    if EMU:
        r = bf16_rne(x)
    else:
        r = x.to(tl.bfloat16).to(tl.float32)
    return r


@triton.jit
def bf16_operand(x, EMU: tl.constexpr):
    """fp32 -> bf16 MMA operand (under the interpreter: the bf16 value held in fp32, whose dot reads raw bits)."""
    if EMU:
        r = bf16_rne(x)
    else:
        r = x.to(tl.bfloat16)
    return r


@triton.jit
def store_cast(ptrs, v, mask, EMU: tl.constexpr):
    """Store fp32 v into an fp32 or bf16 buffer (bf16: round to nearest even)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        if EMU:
            v = (bf16_rne(v).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            v = v.to(tl.bfloat16)
    tl.store(ptrs, v, mask=mask)


# -- e4m3 ---------------------------------------------------------------------------------------------------------
@triton.jit
def to_e4m3(x, EMU: tl.constexpr):
    """fp32 -> float8e4nv: clamped to +-448, then rounded to nearest even (torch's `.clamp(-448, 448).to(e4m3fn)`,
    signed zeros and subnormals included)."""
    v = tl.minimum(tl.maximum(x, -E4M3_MAX_C), E4M3_MAX_C)
    if EMU:
        bits = v.to(tl.uint32, bitcast=True)
        a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        ex = ((bits >> 23) & 0xFF).to(tl.int32)
        # round |v| to a multiple of the e4m3 spacing 2^(e-3) (2^-9 below the normal range): adding and subtracting
        # 1.5 * 2^(spacing + 23) leaves exactly that rounding (to nearest even) to the fp32 adder
        sp = tl.maximum(ex - 3, 118)
        magic = (((sp + 23) << 23) | 0x400000).to(tl.float32, bitcast=True)
        r = (a + magic) - magic
        rb = r.to(tl.uint32, bitcast=True)
        code = tl.where(r < 0.015625, (r * 512.0).to(tl.uint32), (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7))
        q = (code | ((bits >> 24) & 0x80)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        q = v.to(tl.float8e4nv)
    return q


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
    return to_e4m3(y, EMU)


@triton.jit
def row_scale(amax):
    """fp8_quantize_rows' dequantisation scale: clamp(absmax, 1e-12) / 448 (IEEE division)."""
    return tl.div_rn(tl.maximum(amax, 1e-12), E4M3_MAX_C)


# -- activations --------------------------------------------------------------------------------------------------
@triton.jit
def gelu_tanh(x):
    """torch's gelu(approximate='tanh') in fp32, as x * sigmoid(2u) = 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) *
    (x + 0.044715 x^3): exp2 only (no libdevice under the interpreter), and no cancellation of 1 + tanh(u) for
    u << 0, where torch's fp32 value is off by up to ~3e-8 * |x| (the two agree to a bf16 rounding step elsewhere)."""
    u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    u = tl.minimum(tl.maximum(u, -40.0), 40.0)  # keeps exp2 finite; sigmoid(+-80) is 1 / ~0 in fp32
    return x / (1.0 + tl.exp2(u * -2.8853900817779268))


@triton.jit
def tanh(y):
    """fp32 tanh without libdevice: Cephes tanhf (odd polynomial below |y| = 0.625, else 1 - 2/(e^2|y| + 1))."""
    a = tl.abs(y)
    z = y * y
    p = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
         - 3.33332819422e-1) * z * y + y
    q = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(a < 0.625, p, tl.where(y < 0, -q, q))


# -- torch twins (the references' arithmetic) ---------------------------------------------------------------------
def bf16r(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest bf16 value, kept in fp32."""
    return x.float().to(torch.bfloat16).float()


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """The kernels' gelu_tanh in torch (fp32)."""
    x = x.float()
    u = (0.7978845608028654 * (x + 0.044715 * (x * x * x))).clamp(-40.0, 40.0)
    return x / (1.0 + torch.exp2(u * -2.8853900817779268))


quant_rows_ref = fp8_quantize_rows  # per-row absmax / 448, x / s saturated to e4m3: (e4m3 [..., K], fp32 [..., 1])


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
