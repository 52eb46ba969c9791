"""The attention block's input projection as one FP8 GEMM whose epilogue finishes Q, K and V.

Owns `qkv_project` (x e4m3 [T,H] -> q [B,nh,S,hd] returned, K/V written into the KV buffers at their slots),
`rope_tables` (cos/sin of the rows' positions, once per step and layer kind), `fuse_qkv` (the concatenated [q; k; v]
e4m3 weight), the torch references `qkv_ref` / `rope_tables_ref`, configs and AOT specs.

One program owns one whole head (q/k RMSNorm needs all head_dim columns) x BLOCK_M tokens, computed swap-AB: the
head's weight rows are the MMA's M side and the tokens its N side, as two halves so RoPE's rotate-half pairs (j,
j + hd/2) meet in registers. Two [hd/2, BLOCK_M] fp32 accumulators fit 8 warps at hd 512 without spilling, which a
[BLOCK_M >= 64, hd] tile does not. Program column h < nh is a query head, then kv_heads key heads, then (sliding
layers) kv_heads value heads. Full layers have no v weight (k_eq_v): the key program also writes V = v_norm(k_raw)
from the same accumulator. Row t = b*S + s has position past[b] + s; its K/V slot is the position (full layers,
[B, kvh, cap, hd] buffers) or slot_base + s (sliding layers: the extended buffer's W-1 + s, as
fast.FastBackend._write); slots >= cap are dropped, nothing else is written. When S is a multiple of BLOCK_M every tile
lies in one sequence and q/K/V leave as TMA boxes; otherwise as per-row stores.

Roundings follow the eager model: projection -> bf16, q/k/v norm (fp32, one rounding) -> bf16, cos/sin -> bf16
(DiffusionGemma.rope's tables; pairs whose frequency is 0, the last 75% of the proportional full-layer RoPE, get
cos 1, sin 0 and pass through), x*cos and rotate_half(x)*sin each -> bf16, their sum -> bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import aot, configs
from .configs import Config
from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8_gemm import tma_desc
from .numerics import bf16r, device_cc, interpreting, round_bf16

KERNEL = {False: "qkv_sliding", True: "qkv_full"}  # keyed by k_eq_v


@triton.jit
def _store_head(dst, plane, row0, col0, rows, o, mask, HD: tl.constexpr, BT: tl.constexpr, TMA_OUT: tl.constexpr):
    """o [HD/2, BT] (head dims x tokens) -> columns col0.. of a [planes, rows, HD] destination (q: (b, head) planes
    of S rows; caches: (b, kv head) planes of cap slots). TMA_OUT: the BT tokens are consecutive rows row0.. of one
    plane, one box (the hardware drops rows past the plane); else `rows` holds each token's flat row."""
    if TMA_OUT:
        dst.store([plane, row0, col0], tl.trans(o).reshape(1, BT, HD // 2))
    else:
        d = tl.arange(0, HD // 2)
        tl.store(dst + rows[None, :] * HD + col0 + d[:, None], o, mask=mask[None, :])


@triton.jit
def _qkv_kernel(a_desc, a_scale_ptr, w_desc, sw_ptr, qn_ptr, kn_ptr, cos_desc, sin_desc, past_ptr, q_out, k_out,
                v_out, T, S, K, cap, slot_base, eps, NH: tl.constexpr, KVH: tl.constexpr, HD: tl.constexpr,
                K_EQ_V: tl.constexpr, SLOT_FROM_POS: tl.constexpr, TMA_OUT: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, EMU: tl.constexpr):
    HALF: tl.constexpr = HD // 2
    t0 = tl.program_id(0) * BT
    h = tl.program_id(1)
    n0 = h * HD
    # swap-AB: the head's 2 x HALF weight rows are the MMA's M side, the BT tokens its N side, so a whole head
    # fits the accumulators with BT as small as 16 (fp8 wgmma wants both operands K-major: both are)
    lo = tl.zeros((HALF, BT), tl.float32)
    hi = tl.zeros((HALF, BT), tl.float32)
    for k in range(0, K, BK):
        a = a_desc.load([t0, k]).T
        lo = tl.dot(w_desc.load([n0, k]), a, lo)
        hi = tl.dot(w_desc.load([n0 + HALF, k]), a, hi)

    rt = t0 + tl.arange(0, BT)
    d = tl.arange(0, HALF)
    tmask = rt < T
    sa = tl.load(a_scale_ptr + rt, mask=tmask, other=1.0)[None, :]
    x_lo = round_bf16(lo * sa * tl.load(sw_ptr + n0 + d)[:, None], EMU)
    x_hi = round_bf16(hi * sa * tl.load(sw_ptr + n0 + HALF + d)[:, None], EMU)
    ms = tl.div_rn(tl.sum(x_lo * x_lo, axis=0) + tl.sum(x_hi * x_hi, axis=0), HD * 1.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))[None, :]

    b = rt // S
    s = rt % S
    if SLOT_FROM_POS:
        slot = tl.load(past_ptr + b, mask=tmask, other=0) + s
    else:
        slot = slot_base + s
    t_mask = tmask & (slot < cap)
    if TMA_OUT:  # one sequence per tile: the box starts at the tile's first token
        b0 = t0 // S
        s0 = t0 % S
        if SLOT_FROM_POS:
            slot0 = tl.load(past_ptr + b0) + s0
        else:
            slot0 = slot_base + s0

    if (h >= NH + KVH) or (K_EQ_V and h >= NH):  # value head (k_eq_v: from the raw key projection)
        if K_EQ_V:
            kv = h - NH
        else:
            kv = h - NH - KVH
        v_lo = round_bf16(x_lo * rstd, EMU).to(tl.bfloat16)
        v_hi = round_bf16(x_hi * rstd, EMU).to(tl.bfloat16)
        if TMA_OUT:
            _store_head(v_out, b0 * KVH + kv, slot0, 0, rt, v_lo, t_mask, HD, BT, True)
            _store_head(v_out, b0 * KVH + kv, slot0, HALF, rt, v_hi, t_mask, HD, BT, True)
        else:
            rows = (b * KVH + kv).to(tl.int64) * cap + slot
            _store_head(v_out, 0, 0, 0, rows, v_lo, t_mask, HD, BT, False)
            _store_head(v_out, 0, 0, HALF, rows, v_hi, t_mask, HD, BT, False)
    if h < NH + KVH:  # query or key head: weighted RMSNorm, then RoPE
        if h < NH:
            w_lo = tl.load(qn_ptr + d).to(tl.float32)
            w_hi = tl.load(qn_ptr + HALF + d).to(tl.float32)
        else:
            w_lo = tl.load(kn_ptr + d).to(tl.float32)
            w_hi = tl.load(kn_ptr + HALF + d).to(tl.float32)
        n_lo = round_bf16(x_lo * rstd * w_lo[:, None], EMU)
        n_hi = round_bf16(x_hi * rstd * w_hi[:, None], EMU)
        c = tl.trans(cos_desc.load([t0, 0])).to(tl.float32)
        sn = tl.trans(sin_desc.load([t0, 0])).to(tl.float32)
        o_lo = round_bf16(round_bf16(n_lo * c, EMU) - round_bf16(n_hi * sn, EMU), EMU).to(tl.bfloat16)
        o_hi = round_bf16(round_bf16(n_hi * c, EMU) + round_bf16(n_lo * sn, EMU), EMU).to(tl.bfloat16)
        if h < NH:
            if TMA_OUT:
                _store_head(q_out, b0 * NH + h, s0, 0, rt, o_lo, tmask, HD, BT, True)
                _store_head(q_out, b0 * NH + h, s0, HALF, rt, o_hi, tmask, HD, BT, True)
            else:
                rows = (b * NH + h).to(tl.int64) * S + s
                _store_head(q_out, 0, 0, 0, rows, o_lo, tmask, HD, BT, False)
                _store_head(q_out, 0, 0, HALF, rows, o_hi, tmask, HD, BT, False)
        else:
            if TMA_OUT:
                _store_head(k_out, b0 * KVH + h - NH, slot0, 0, rt, o_lo, t_mask, HD, BT, True)
                _store_head(k_out, b0 * KVH + h - NH, slot0, HALF, rt, o_hi, t_mask, HD, BT, True)
            else:
                rows = (b * KVH + h - NH).to(tl.int64) * cap + slot
                _store_head(k_out, 0, 0, 0, rows, o_lo, t_mask, HD, BT, False)
                _store_head(k_out, 0, 0, HALF, rows, o_hi, t_mask, HD, BT, False)


@triton.jit
def _rope_table_kernel(past_ptr, inv_freq_ptr, cos_ptr, sin_ptr, T, S, BT: tl.constexpr, HALF: tl.constexpr,
                       EMU: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.arange(0, HALF)
    m = (rows < T)[:, None]
    pos = tl.load(past_ptr + rows // S, mask=rows < T, other=0) + rows % S
    ang = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + d)[None, :]  # model.DiffusionGemma.rope's fp32 product
    off = rows.to(tl.int64)[:, None] * HALF + d[None, :]
    tl.store(cos_ptr + off, round_bf16(tl.cos(ang), EMU).to(tl.bfloat16), mask=m)
    tl.store(sin_ptr + off, round_bf16(tl.sin(ang), EMU).to(tl.bfloat16), mask=m)


# -- configs ----------------------------------------------------------------------------------------------------------
# Untuned defaults; block_m = tokens per program (the MMA's N side), block_n = head_dim. Two fp32 accumulators of
# [hd/2, block_m] over 8 warps: 64 registers per thread (sliding, 64 tokens; full, 32 tokens). At 256 rows: 4 x 32 =
# 128 programs (sliding), 8 x 18 = 144 (full; its key programs also write V). Each head's weights are read once
# from HBM and T/block_m times from L2.
configs.register(KERNEL[False], {
    90: [(4096, Config(64, 256, 128, 1, 1, 8, 3))],
    100: [(4096, Config(64, 256, 128, 1, 1, 8, 3))],
    120: [(4096, Config(64, 256, 64, 1, 1, 8, 2))],
})
configs.register(KERNEL[True], {
    90: [(4096, Config(32, 512, 64, 1, 1, 8, 3))],
    100: [(4096, Config(32, 512, 64, 1, 1, 8, 3))],
    120: [(4096, Config(32, 512, 32, 1, 1, 8, 2))],
})


# -- launcher ---------------------------------------------------------------------------------------------------------
def fuse_qkv(q: tuple[torch.Tensor, torch.Tensor], k: tuple[torch.Tensor, torch.Tensor],
             v: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale) pairs of q_proj, k_proj[, v_proj] -> the [q; k; v] weight qkv_project reads."""
    parts = [q, k] + ([v] if v is not None else [])
    return torch.cat([w for w, _ in parts]).contiguous(), torch.cat([s.reshape(-1) for _, s in parts]).float()


def rope_tables(past: torch.Tensor, seq_len: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin bf16 [B*S, hd/2] of positions past[b] + s: model.DiffusionGemma.rope's values (its tables repeat
    these twice along hd). Once per step and layer kind, read by every query and key program of every layer; the
    proportional table's zero frequencies give cos 1, sin 0 (no rotation)."""
    b, half = past.shape[0], inv_freq.shape[0]
    t = b * seq_len
    cos = torch.empty(t, half, dtype=torch.bfloat16, device=past.device)
    sin = torch.empty_like(cos)
    bt = 8
    _rope_table_kernel[(triton.cdiv(t, bt),)](past, inv_freq.float().contiguous(), cos, sin, t, seq_len, BT=bt,
                                              HALF=half, EMU=interpreting(), num_warps=4)
    return cos, sin


def qkv_project(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, n_heads: int,
                kv_heads: int, head_dim: int, q_norm: torch.Tensor, k_norm: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, past: torch.Tensor, seq_len: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_base: int | None = None, eps: float = 1e-6, q_out: torch.Tensor | None = None,
                config: Config | None = None) -> torch.Tensor:
    """a e4m3 [B*S,H] + a_scale fp32 [B*S,1] (the input_layernorm output, quantised per row), w/w_scale from
    fuse_qkv (k_eq_v when it has no v rows), cos/sin bf16 [B*S, >= hd/2] or [B, S, >= hd/2] (rope_tables, or the
    model's own [B, S, hd] tables), past int32 [B] (tokens before this call), k/v_cache contiguous bf16
    [B, kv_heads, cap, head_dim] -> q bf16 [B, n_heads, S, head_dim].

    slot_base None: K/V of row (b, s) go to slot past[b] + s (full layers); else to slot_base + s (sliding layers'
    extended buffers, slot_base = W - 1). Slots >= cap are not written; nothing else in the buffers is touched."""
    t, hsz = a.shape
    b = t // seq_len
    assert b * seq_len == t and past.shape == (b,) and past.dtype == torch.int32
    assert a.dtype == w.dtype == torch.float8_e4m3fn and a_scale.dtype == w_scale.dtype == torch.float32
    k_eq_v = w.shape[0] == (n_heads + kv_heads) * head_dim
    assert k_eq_v or w.shape[0] == (n_heads + 2 * kv_heads) * head_dim, "w rows: (nh + kvh [+ kvh]) * head_dim"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert k_cache.shape[:2] == (b, kv_heads) and k_cache.shape[3] == head_dim
    cfg = config or configs.lookup(KERNEL[k_eq_v], device_cc(a.device), t)
    bt, half, cap = cfg.block_m, head_dim // 2, k_cache.shape[2]
    q = q_out if q_out is not None else torch.empty(b, n_heads, seq_len, head_dim, dtype=torch.bfloat16,
                                                    device=a.device)
    assert q.is_contiguous() and q.shape == (b, n_heads, seq_len, head_dim)
    cos, sin = cos.reshape(t, -1), sin.reshape(t, -1)
    tma_out = seq_len % bt == 0  # every tile inside one sequence: outputs leave as TMA boxes
    if tma_out:
        q_dst = TensorDescriptor(q, [b * n_heads, seq_len, head_dim], [seq_len * head_dim, head_dim, 1], [1, bt, half])
        k_dst, v_dst = (TensorDescriptor(c, [b * kv_heads, cap, head_dim], [cap * head_dim, head_dim, 1],
                                         [1, bt, half]) for c in (k_cache, v_cache))
    else:
        q_dst, k_dst, v_dst = q, k_cache, v_cache
    grid = (triton.cdiv(t, bt), n_heads + kv_heads * (1 if k_eq_v else 2))
    _qkv_kernel[grid](
        tma_desc(a, [bt, cfg.block_k]), a_scale.reshape(-1), tma_desc(w, [half, cfg.block_k]), w_scale, q_norm,
        k_norm, tma_desc(cos[:, :half], [bt, half]), tma_desc(sin[:, :half], [bt, half]), past, q_dst, k_dst, v_dst,
        t, seq_len, hsz, cap, 0 if slot_base is None else slot_base, float(eps),
        NH=n_heads, KVH=kv_heads, HD=head_dim, K_EQ_V=k_eq_v, SLOT_FROM_POS=slot_base is None, TMA_OUT=tma_out,
        BT=bt, BK=cfg.block_k, EMU=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return q


# -- torch reference --------------------------------------------------------------------------------------------------
def rope_tables_ref(past, seq_len, inv_freq):
    pos = past.long()[:, None] + torch.arange(seq_len, device=past.device)[None, :]
    ang = (pos.float()[..., None] * inv_freq.float()).reshape(-1, inv_freq.shape[0])
    return ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)


def qkv_ref(a, a_scale, w, w_scale, *, n_heads, kv_heads, head_dim, q_norm, k_norm, cos, sin, past, seq_len,
            k_cache, v_cache, slot_base=None, eps=1e-6):
    """The kernel's arithmetic in torch; writes k_cache/v_cache in place, returns q [B,nh,S,hd]."""
    t = a.shape[0]
    b, s_len = t // seq_len, seq_len
    k_eq_v = w.shape[0] == (n_heads + kv_heads) * head_dim
    x = bf16r((a.float() * a_scale.reshape(-1, 1)) @ (w.float() * w_scale.reshape(-1, 1)).t())
    x = x.view(b, s_len, -1, head_dim)
    rstd = 1.0 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    pos = past.long()[:, None] + torch.arange(s_len, device=past.device)[None, :]  # [B,S]
    half = head_dim // 2
    c = cos.reshape(b, s_len, -1)[..., :half].float()
    sn = sin.reshape(b, s_len, -1)[..., :half].float()
    c, sn = torch.cat([c, c], -1)[:, :, None], torch.cat([sn, sn], -1)[:, :, None]

    def rope(n):
        rot = torch.cat([-n[..., head_dim // 2:], n[..., :head_dim // 2]], -1)
        return bf16r(bf16r(n * c) + bf16r(rot * sn))

    n = (x * rstd)  # [B,S,heads,hd]; weights and roundings per head kind below
    q = rope(bf16r(n[:, :, :n_heads] * q_norm.float()))
    k = rope(bf16r(n[:, :, n_heads:n_heads + kv_heads] * k_norm.float()))
    v = bf16r(n[:, :, n_heads:n_heads + kv_heads] if k_eq_v else n[:, :, n_heads + kv_heads:])
    new = slot_base + torch.arange(s_len, device=past.device) if slot_base is not None else None
    slots = pos if slot_base is None else new[None, :].expand(b, -1)
    for bi in range(b):
        ok = slots[bi] < k_cache.shape[2]
        k_cache[bi][:, slots[bi][ok]] = k[bi][ok].transpose(0, 1).to(k_cache.dtype)
        v_cache[bi][:, slots[bi][ok]] = v[bi][ok].transpose(0, 1).to(v_cache.dtype)
    return q.transpose(1, 2).to(torch.bfloat16).contiguous()


# -- AOT --------------------------------------------------------------------------------------------------------------
SHAPES = {False: dict(NH=16, KVH=8, HD=256), True: dict(NH=16, KVH=2, HD=512)}  # sliding, full


def aot_specs() -> list[aot.AotSpec]:
    out = []
    for k_eq_v, kernel in KERNEL.items():
        shape = SHAPES[k_eq_v]
        half = shape["HD"] // 2
        for fam, rows, cfg in configs.production(kernel):
            bt, bk = cfg.block_m, cfg.block_k
            box = f"tensordesc<bf16[1, {bt}, {half}]>"
            sig = {"a_desc": f"tensordesc<fp8e4nv[{bt}, {bk}]>", "a_scale_ptr": "*fp32",
                   "w_desc": f"tensordesc<fp8e4nv[{half}, {bk}]>", "sw_ptr": "*fp32", "qn_ptr": "*bf16",
                   "kn_ptr": "*bf16", "cos_desc": f"tensordesc<bf16[{bt}, {half}]>",
                   "sin_desc": f"tensordesc<bf16[{bt}, {half}]>", "past_ptr": "*i32", "q_out": box, "k_out": box,
                   "v_out": box, "T": "i32", "S": "i32", "K": "i32", "cap": "i32", "slot_base": "i32", "eps": "fp32"}
            sig.update({n: "constexpr" for n in ("NH", "KVH", "HD", "K_EQ_V", "SLOT_FROM_POS", "TMA_OUT", "BT", "BK",
                                                 "EMU")})
            const = dict(shape, K_EQ_V=k_eq_v, SLOT_FROM_POS=k_eq_v, TMA_OUT=True, BT=bt, BK=bk, EMU=False)
            out.append(aot.AotSpec(f"{kernel}/rows<={rows}", _qkv_kernel, sig, const, fam, cfg.num_warps,
                                   cfg.num_stages, tensor_cores=True))
    sig = {"past_ptr": "*i32", "inv_freq_ptr": "*fp32", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "T": "i32", "S": "i32",
           "BT": "constexpr", "HALF": "constexpr", "EMU": "constexpr"}
    for shape in SHAPES.values():
        out += [aot.AotSpec(f"rope_table/hd{shape['HD']}", _rope_table_kernel, sig,
                            dict(BT=8, HALF=shape["HD"] // 2, EMU=False), cc, 4, 1) for cc in aot.ARCHS]
    return out
