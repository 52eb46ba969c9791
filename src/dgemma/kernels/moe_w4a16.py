"""Routed experts with 4-bit weights on bf16 tensor cores (W4A16, docs/kernels.md item 6): ModelOpt's NVFP4 expert
layout (packed e2m1 pairs, e4m3 scales per 16 along K, fp32 global scale per expert) dequantized to bf16 in registers
inside the GEMMs, activations unquantized bf16. Owns the two GEMM kernels, the dequantization they share (and its
debug entry `nvfp4_dequant`), `w4a16_moe`, `w4a16_moe_reference`, configs and AOT specs; dispatch and combine are
`moe`'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..model.lowp import NVFP4_BLOCK, nvfp4_decode
from . import configs, moe
from .configs import Config
from .moe import _acc, _mma, _tile_ptrs, _tile_rows, _tokens_major
from .numerics import bf16_operand, gelu_tanh, gelu_tanh_ref, interpreting, round_bf16, store_cast

BLOCK = NVFP4_BLOCK  # along K


@triton.jit
def _e2m1(codes):
    """4-bit e2m1 codes -> fp32, built as bits: magnitude code m >= 2 is 2^(m>>1 - 1)·(1 + (m&1)/2), i.e. the fp32
    exponent/mantissa fields are m shifted into place plus a bias of 126; m = 1 is 0.5 and m = 0 is 0; bit 3 is the
    sign (code 8 is -0.0)."""
    c = codes.to(tl.uint32)
    m = c & 7
    mag = tl.where(m >= 2, (m << 22) + (126 << 23), m * (126 << 23))
    return (mag | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _nvfp4_tile(p_ptrs, s_ptrs, gscale, k0, nmask, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EMULATE: tl.constexpr):
    """Weight rows [BLOCK_N, BLOCK_K] at column k0 as bf16, with qdq_ops.nvfp4_dq's arithmetic: block scale =
    bf16(e4m3 scale x global scale in fp32), weight = bf16(e2m1 value x block scale). p_ptrs: [BLOCK_N, BLOCK_K/2]
    pointers to the packed bytes of column 0, s_ptrs: [BLOCK_N, BLOCK_K/16] to the scales of column 0."""
    kh = tl.arange(0, BLOCK_K // 2)
    ks = tl.arange(0, BLOCK_K // 16)
    b = tl.load(p_ptrs + k0 // 2, mask=nmask[:, None] & (k0 // 2 + kh < K // 2)[None, :], other=0)
    bs = tl.load(s_ptrs + k0 // 16, mask=nmask[:, None] & (k0 // 16 + ks < K // 16)[None, :], other=0.0)
    s = round_bf16(bs.to(tl.float32) * gscale, EMULATE)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, BLOCK_K // 16, 16]), [BLOCK_N, BLOCK_K])
    codes = tl.reshape(tl.join(b & 0xF, b >> 4), [BLOCK_N, BLOCK_K])  # the low nibble is the even element
    return bf16_operand(_e2m1(codes) * s, EMULATE)


@triton.jit
def _w4a16_gate_up_kernel(x_ptr, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, num_tiles_ptr,
                          wp_ptr, wsc_ptr, wg_ptr, h_ptr, H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EMULATE: tl.constexpr):
    """One tile x BLOCK_N gate columns and the matching up columns: h = GELU(x @ gateᵀ)·(x @ upᵀ), stored bf16."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, rmask, pair = _tile_rows(tile, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < I
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = _tile_ptrs(x_ptr, pair // TOP_K, kk, H)  # the tile's token rows, gathered in place
    e64 = e.to(tl.int64)
    gp = _tile_ptrs(wp_ptr + e64 * (I * H), rn, tl.arange(0, BLOCK_K // 2), H // 2)
    gs = wsc_ptr + e64 * (2 * I * (H // 16)) + rn[:, None] * (H // 16) + tl.arange(0, BLOCK_K // 16)[None, :]
    gscale = tl.load(wg_ptr + e)
    acc_g = _acc(BLOCK_M, BLOCK_N)
    acc_u = _acc(BLOCK_M, BLOCK_N)
    for k0 in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=rmask[:, None] & (k0 + kk < H)[None, :], other=0.0)
        a = bf16_operand(a.to(tl.float32), EMULATE)
        wg = _nvfp4_tile(gp, gs, gscale, k0, nmask, H, BLOCK_N, BLOCK_K, EMULATE)
        acc_g = _mma(acc_g, a, wg, BLOCK_M)
        wu = _nvfp4_tile(gp + I * (H // 2), gs + I * (H // 16), gscale, k0, nmask, H, BLOCK_N, BLOCK_K, EMULATE)
        acc_u = _mma(acc_u, a, wu, BLOCK_M)
    h = gelu_tanh(_tokens_major(acc_g, BLOCK_M)) * _tokens_major(acc_u, BLOCK_M)
    store_cast(_tile_ptrs(h_ptr, rows, rn, I), h, rmask[:, None] & nmask[None, :], EMULATE)


@triton.jit
def _w4a16_down_kernel(h_ptr, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, num_tiles_ptr,
                       wp_ptr, wsc_ptr, wg_ptr, rw_ptr, y_ptr, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """One tile x BLOCK_N output columns: y = (h @ downᵀ) · routing weight, written to its (token, slot) rows."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, rmask, pair = _tile_rows(tile, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < H
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = _tile_ptrs(h_ptr, rows, kk, I)
    e64 = e.to(tl.int64)
    dp = _tile_ptrs(wp_ptr + e64 * (H * (I // 2)), rn, tl.arange(0, BLOCK_K // 2), I // 2)
    ds = wsc_ptr + e64 * (H * (I // 16)) + rn[:, None] * (I // 16) + tl.arange(0, BLOCK_K // 16)[None, :]
    gscale = tl.load(wg_ptr + e)
    acc = _acc(BLOCK_M, BLOCK_N)
    for k0 in range(0, I, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=rmask[:, None] & (k0 + kk < I)[None, :], other=0.0)
        if EMULATE:
            a = a.to(tl.float32)
        acc = _mma(acc, a, _nvfp4_tile(dp, ds, gscale, k0, nmask, I, BLOCK_N, BLOCK_K, EMULATE), BLOCK_M)
    y = _tokens_major(acc, BLOCK_M) * tl.load(rw_ptr + pair, mask=rmask, other=0.0)[:, None]
    store_cast(_tile_ptrs(y_ptr, pair, rn, H), y, rmask[:, None] & nmask[None, :], EMULATE)


@triton.jit
def _nvfp4_dequant_kernel(wp_ptr, wsc_ptr, wg_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """Writes the GEMMs' dequantized tiles (`_nvfp4_tile`) to out [E, N, K] bf16: the exactness check's window."""
    e64 = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(2) * BLOCK_K
    nmask = rn < N
    p = _tile_ptrs(wp_ptr + e64 * (N * (K // 2)), rn, tl.arange(0, BLOCK_K // 2), K // 2)
    s = wsc_ptr + e64 * (N * (K // 16)) + rn[:, None] * (K // 16) + tl.arange(0, BLOCK_K // 16)[None, :]
    w = _nvfp4_tile(p, s, tl.load(wg_ptr + e64), k0, nmask, K, BLOCK_N, BLOCK_K, EMULATE)
    rk = k0 + tl.arange(0, BLOCK_K)
    store_cast(out_ptr + e64 * (N * K) + rn[:, None] * K + rk[None, :], w, nmask[:, None] & (rk < K)[None, :],
                EMULATE)


def nvfp4_dequant(packed: Tensor, scale: Tensor, scale_2: Tensor, *, block_n: int = 32, block_k: int = 64) -> Tensor:
    """Debug entry: packed uint8 [E,N,K/2], e4m3 [E,N,K/16], fp32 [E] -> the bf16 [E,N,K] the GEMMs multiply."""
    e, n, kh = packed.shape
    out = moe.empty(e, n, 2 * kh, dtype=torch.bfloat16, device=packed.device)
    _nvfp4_dequant_kernel[(e, triton.cdiv(n, block_n), triton.cdiv(2 * kh, block_k))](
        packed.view(torch.uint8), scale, scale_2.float().contiguous(), out, N=n, K=2 * kh, BLOCK_N=block_n,
        BLOCK_K=block_k, EMULATE=interpreting())
    return out


GATE_UP, DOWN = "moe_w4a16_gate_up", "moe_w4a16_down"


_cfg = configs.tile


# buckets: tokens per expert, as for FP8 (block_m < 64 swaps A/B: the dequantized weights are then the MMA's A
# operand, which wgmma can take from registers). A [BLOCK_N, BLOCK_K] dequantized tile costs BLOCK_N*BLOCK_K/threads
# fp32 registers while it is built, twice in gate/up: tiles stay at 64x64 per 4 warps there.
configs.register(GATE_UP, {
    90: [(16, _cfg(16, 64, 64, 4, 4)), (32, _cfg(32, 64, 64, 4, 4)), (64, _cfg(64, 64, 64, 4, 4)),
         (128, _cfg(128, 64, 64, 8, 3))],
    100: [(16, _cfg(16, 64, 64, 4, 4)), (32, _cfg(32, 64, 64, 4, 4)), (64, _cfg(64, 64, 64, 4, 4)),
          (128, _cfg(128, 64, 64, 8, 3))],
    120: [(16, _cfg(16, 64, 64, 4, 3)), (32, _cfg(32, 64, 64, 4, 3)), (64, _cfg(64, 64, 64, 8, 3)),
          (128, _cfg(128, 64, 64, 8, 2))],
})
# down: one dequantized tile per K step (not two), so the FP8 down kernel's tiles fit (AOT-gated with these weights);
# the same defaults until a GPU tunes either
configs.register(DOWN, dict(configs.TABLES[moe.DOWN]))


def w4a16_moe(x: Tensor, weights: Tensor, idx: Tensor, gate_up_packed: Tensor, gate_up_scale: Tensor,
              gate_up_scale_2: Tensor, down_packed: Tensor, down_scale: Tensor, down_scale_2: Tensor, *,
              config: tuple[Config, Config] | None = None) -> Tensor:
    """Routed experts with NVFP4 weights (ModelOpt layout: gate_up packed uint8 [E,2I,H/2], e4m3 [E,2I,H/16], fp32
    [E]; down [E,H,I/2], [E,H,I/16], [E]) on bf16 MMA: x [T,H] bf16/fp32 (rounded to bf16), weights fp32 [T,k],
    idx [T,k] -> [T,H] in x.dtype. Four kernels, no host sync, shapes fixed by T (CUDA-graph capturable)."""
    t, k = idx.shape
    e, i2, hh = gate_up_packed.shape
    h, i, p, dev = 2 * hh, i2 // 2, t * k, x.device
    if h % BLOCK or i % BLOCK:
        raise ValueError(f"NVFP4 needs hidden and intermediate sizes divisible by {BLOCK}, not {h} and {i}")
    x = x.reshape(t, h).contiguous()
    ydt = moe.pair_dtype(x)
    cg, cd = config or moe.launch_configs(GATE_UP, DOWN, dev, p, e)
    r = moe.dispatch(idx, e, cg.block_m)
    hbuf = moe.empty(p, i, dtype=torch.bfloat16, device=dev)
    mt = r.tile_expert.numel()
    gu, dn = gate_up_packed.view(torch.uint8), down_packed.view(torch.uint8)
    _w4a16_gate_up_kernel[(mt, triton.cdiv(i, cg.block_n))](
        x, r.order, r.offsets, r.tile_expert, r.tile_start, r.num_tiles, gu, gate_up_scale,
        gate_up_scale_2.float().contiguous(), hbuf, H=h, I=i, TOP_K=k, **cg.constexprs(),
        EMULATE=interpreting(), num_warps=cg.num_warps, num_stages=cg.num_stages)
    y = moe.empty(p, h, dtype=ydt, device=dev)
    _w4a16_down_kernel[(mt, triton.cdiv(h, cd.block_n))](
        hbuf, r.order, r.offsets, r.tile_expert, r.tile_start, r.num_tiles, dn, down_scale,
        down_scale_2.float().contiguous(), weights.reshape(-1).float().contiguous(), y, H=h, I=i, **cd.constexprs(),
        EMULATE=interpreting(), num_warps=cd.num_warps, num_stages=cd.num_stages)
    return moe.combine(y, t, k, x.dtype)


# -- torch reference ----------------------------------------------------------------------------------------------
def nvfp4_dequant_reference(packed: Tensor, scale: Tensor, scale_2: Tensor) -> Tensor:
    """packed uint8 [E,N,K/2] (low nibble first), e4m3 [E,N,K/16], fp32 [E] -> bf16 [E,N,K]: model.lowp.nvfp4_decode."""
    return nvfp4_decode(packed, scale, scale_2, torch.bfloat16)


def w4a16_moe_reference(x: Tensor, weights: Tensor, idx: Tensor, gate_up_packed: Tensor, gate_up_scale: Tensor,
                        gate_up_scale_2: Tensor, down_packed: Tensor, down_scale: Tensor,
                        down_scale_2: Tensor) -> Tensor:
    """`w4a16_moe` in torch: bf16 x and dequantized bf16 weights multiplied in fp32 (exact products, fp32 sums);
    h = GELU(g)·u rounded to bf16; y = acc·routing weight in the pair dtype; the k slots summed in slot order."""
    t, k = idx.shape
    wgu = nvfp4_dequant_reference(gate_up_packed, gate_up_scale, gate_up_scale_2).float()
    wd = nvfp4_dequant_reference(down_packed, down_scale, down_scale_2).float()
    e, i2, h = wgu.shape
    i = i2 // 2
    x = x.reshape(t, h)
    xb = x.to(torch.bfloat16).float()
    flat, rw = idx.reshape(-1), weights.reshape(-1).float()
    y = torch.zeros(t * k, h, dtype=moe.pair_dtype(x), device=x.device)
    for ex in range(e):
        pairs = (flat == ex).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        acc = xb[pairs // k] @ wgu[ex].t()
        hb = (gelu_tanh_ref(acc[:, :i]) * acc[:, i:]).to(torch.bfloat16).float()
        y[pairs] = ((hb @ wd[ex].t()) * rw[pairs][:, None]).to(y.dtype)
    return moe.combine_reference(y.view(t, k, h), x.dtype)


# -- AOT ----------------------------------------------------------------------------------------------------------
def aot_specs():
    h, i, k = moe.FULL["H"], moe.FULL["I"], moe.FULL["TOP_K"]
    gu = dict(moe._ROUTE, x_ptr="*bf16", wp_ptr="*u8", wsc_ptr="*fp8e4nv", wg_ptr="*fp32", h_ptr="*bf16")
    dn = dict(moe._ROUTE, h_ptr="*bf16", wp_ptr="*u8", wsc_ptr="*fp8e4nv", wg_ptr="*fp32", rw_ptr="*fp32",
              y_ptr="*bf16")
    return (moe.gemm_specs(GATE_UP, _w4a16_gate_up_kernel, gu, {"H": h, "I": i, "TOP_K": k})
            + moe.gemm_specs(DOWN, _w4a16_down_kernel, dn, {"H": h, "I": i}))
