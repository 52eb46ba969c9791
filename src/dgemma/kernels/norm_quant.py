"""RMSNorm fused with per-row e4m3 quantisation: the prologue of an FP8 GEMM in one pass over [T, K].

Owns `norm_quant` (x -> e4m3 [T,K] + fp32 scale [T,1], optionally the bf16 normed rows too), `quant_rows` (the
quantisation alone), their torch reference `norm_quant_ref`, launch configs and AOT specs. Arithmetic:
y = bf16(x * (1/sqrt(mean(x^2) + eps)) [* weight]) exactly as model.Ops.rms_norm (up to the last bit of the reciprocal
root and the order of the sum of squares), then model.lowp.fp8_quantize_rows(y): s = max(|y|, 1e-12) / 448,
q = e4m3(clamp(y / s)) with IEEE division and round-to-nearest-even. One row of K <= 16384 per program, in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import aot, configs
from .configs import Config
from .numerics import device_cc, interpreting, quant_rows_ref, rms_norm_ref, round_bf16, row_scale, to_e4m3

KERNEL = "norm_quant"


@triton.jit
def _norm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, y_ptr, T, K, stride_x, stride_q, stride_y, eps,
                       NORM: tl.constexpr, HAS_W: tl.constexpr, STORE_Q: tl.constexpr, STORE_Y: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_K: tl.constexpr, EMU: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    m = (rows < T)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM:
        ms = tl.div_rn(tl.sum(x * x, axis=1), K.to(tl.float32))
        y = x * tl.div_rn(1.0, tl.sqrt_rn(ms + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = round_bf16(y, EMU)  # Ops.rms_norm returns the model dtype: quantise what the model would
    else:
        y = x
    if STORE_Y:
        tl.store(y_ptr + r64 * stride_y + cols[None, :], y.to(tl.bfloat16), mask=m)
    if STORE_Q:
        s = row_scale(tl.max(tl.abs(y), axis=1))  # padding columns are 0: they never raise the max
        q = to_e4m3(tl.div_rn(y, s[:, None]), EMU)  # clamps to +-448
        tl.store(q_ptr + r64 * stride_q + cols[None, :], q, mask=m)
        tl.store(s_ptr + rows, s, mask=rows < T)


# rows per program and warps by arch family and canvas rows (T = 256 * batch); K = 2816 -> BLOCK_K 4096.
# Untuned default: one row per program keeps >= 256 programs at batch 1 (132 SMs on H100, 170 on RTX 5090).
configs.register(KERNEL, {fam: [(4096, Config(block_m=1, num_warps=8, num_stages=1))] for fam in (90, 100, 120)}
                 | {0: [(4096, Config(block_m=16, num_warps=8, num_stages=1))]})  # interpreter: it pays per program


def norm_quant(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, norm: bool = True,
               quant: bool = True, want_bf16: bool = False, out: tuple | None = None,
               config: Config | None = None):
    """x [..., K] -> (q e4m3 [T,K], s fp32 [T,1]) [+ y bf16 [T,K] if want_bf16]; T = x.numel() // K.

    norm=False quantises x itself (model.lowp.fp8_quantize_rows(x)); quant=False returns only the bf16 normed rows.
    out: preallocated outputs in the order returned."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t = x2.shape[0]
    dev = x.device
    cfg = config or configs.lookup(KERNEL, device_cc(dev), t)
    if out is not None:
        q, s, y = (None, None, out[0]) if not quant else (out[0], out[1], out[2] if want_bf16 else None)
    else:
        q = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=dev) if quant else None
        s = torch.empty(t, 1, dtype=torch.float32, device=dev) if quant else None
        y = torch.empty(t, k, dtype=torch.bfloat16, device=dev) if want_bf16 or not quant else None
    dummy = x2
    _norm_quant_kernel[(triton.cdiv(t, cfg.block_m),)](
        x2, weight if weight is not None else dummy, q if quant else dummy, s if quant else dummy,
        y if y is not None else dummy, t, k, x2.stride(0), q.stride(0) if quant else k,
        y.stride(0) if y is not None else k, float(eps),
        NORM=norm, HAS_W=weight is not None and norm, STORE_Q=quant, STORE_Y=y is not None, ROWS=cfg.block_m,
        BLOCK_K=triton.next_power_of_2(k), EMU=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not quant:
        return y
    return (q, s, y) if want_bf16 else (q, s)


def quant_rows(x: torch.Tensor, config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """model.lowp.fp8_quantize_rows(x) as one kernel: x [..., K] -> (e4m3 [T,K], fp32 [T,1])."""
    return norm_quant(x, None, norm=False, config=config)


def norm_quant_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, norm: bool = True):
    """The kernel's arithmetic in torch: (q, s, y bf16)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = rms_norm_ref(x2, weight, eps) if norm else x2.float()
    q, s = quant_rows_ref(y)
    return q, s, y.to(torch.bfloat16)


# -- AOT ------------------------------------------------------------------------------------------------------------
PRODUCTION_K = 2816  # hidden size: input_layernorm, self-conditioning pre_norm, pre-FFN norms


def aot_specs() -> list[aot.AotSpec]:
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "T": "i32",
           "K": "i32", "stride_x": "i32", "stride_q": "i32", "stride_y": "i32", "eps": "fp32"}
    sig.update({k: "constexpr" for k in ("NORM", "HAS_W", "STORE_Q", "STORE_Y", "ROWS", "BLOCK_K", "EMU")})
    variants = {"rmsnorm+quant": dict(NORM=True, HAS_W=True, STORE_Q=True, STORE_Y=False),
                "quant": dict(NORM=False, HAS_W=False, STORE_Q=True, STORE_Y=False)}
    out = []
    for fam, rows, cfg in configs.production(KERNEL):
        for name, v in variants.items():
            const = dict(v, ROWS=cfg.block_m, BLOCK_K=triton.next_power_of_2(PRODUCTION_K), EMU=False)
            out.append(aot.AotSpec(f"{KERNEL}/{name}/rows<={rows}", _norm_quant_kernel, sig, const, fam,
                                   cfg.num_warps, cfg.num_stages))
    return out
