"""The layer's residual-stream kernels around the FFN: everything between the o_proj GEMM and the FFN GEMMs, and
everything after them up to the next layer's QKV GEMM.

Owns
* `post_attention`: r = x + post_attention_layernorm(attn_out); from r, pre_feedforward_layernorm(r) (the dense MLP's
  input, e4m3 + row scale and/or bf16), pre_feedforward_layernorm_2(r) (the experts' input, likewise) and the routing
  (rms_norm(r) * router.scale * H^-0.5 -> @ router.proj^T -> bf16 logits -> softmax fp32 -> top-k -> renormalise ->
  * per_expert_scale), one kernel, HBM read of x and attn_out once;
* `post_ffn`: out = (r + post_feedforward_layernorm(post_feedforward_layernorm_1(h1) +
  post_feedforward_layernorm_2(h2))) * layer_scalar from the raw dense-MLP and MoE outputs, and optionally the next
  layer's input_layernorm(out) (e4m3 + row scale for its QKV GEMM, or bf16, e.g. the final norm before the LM head);
* their torch references `post_attention_ref`, `post_ffn_ref`, configs and AOT specs.

Roundings follow the eager model (model.Layer.ffn, model.Router): every norm output, sum and product the model keeps
as a bf16 tensor is rounded to bf16; norms in fp32 with one rounding; router logits bf16 (F.linear in the model
dtype), softmax and routing weights fp32. Norm reciprocal roots are correctly rounded 1/sqrt (numerics.rms_norm_ref).
Top-k: descending probability, equal probabilities in ascending expert order (torch.topk leaves the order of ties
unspecified: on CPU it varies; the selected set differs from torch's only for a tie across the k-th place, with the
same renormalised weights).

post_attention needs a tensor-core dot for the router ([rows, H] @ [H, E]) and so works on blocks of BLOCK_M >= 16
rows, looping over H in BLOCK_K chunks: pass 1 sums attn^2, pass 2 builds r (stored) and sums r^2, pass 3 forms the
norms (row absmax; bf16 stores) and the router logits, pass 4 quantises. Passes 2-4 re-read x and attn_out, from L2.
post_ffn keeps whole rows in registers (one pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import aot, configs
from .configs import Config
from .fp8_gemm import tma_desc
from .numerics import bf16r, device_cc, interpreting, quant_rows_ref, rms_norm_ref, round_bf16, row_scale, to_e4m3

POST_ATTENTION, POST_FFN = "post_attention", "post_ffn"


@triton.jit
def _rstd(sumsq, n, eps):
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sumsq, n * 1.0) + eps))


@triton.jit
def _quant_store(q_ptr, off, y, s, mask, EMU: tl.constexpr):
    q = to_e4m3(tl.div_rn(y, s[:, None]), EMU)  # clamps to +-448
    tl.store(q_ptr + off, q, mask=mask)


@triton.jit
def _post_attention_kernel(x_ptr, attn_ptr, wpa_ptr, wff_ptr, wff2_ptr, rscale_ptr, proj_desc, pes_ptr,
                           r_ptr, q1_ptr, s1_ptr, y1_ptr, q2_ptr, s2_ptr, y2_ptr, tw_ptr, ti_ptr,
                           T, H, E, eps, root,
                           Q1: tl.constexpr, Y1: tl.constexpr, Q2: tl.constexpr, Y2: tl.constexpr,
                           TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                           BM: tl.constexpr, BK: tl.constexpr, EMU: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < T
    r64 = rows.to(tl.int64)[:, None] * H
    cols = tl.arange(0, BK)
    experts = tl.arange(0, E_PAD)

    sq_a = tl.zeros((BM,), tl.float32)
    for k in range(0, H, BK):
        c = k + cols
        m = rmask[:, None] & (c < H)[None, :]
        a = tl.load(attn_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
        sq_a += tl.sum(a * a, axis=1)
    rstd_a = _rstd(sq_a, H, eps)[:, None]

    sq_r = tl.zeros((BM,), tl.float32)
    for k in range(0, H, BK):
        c = k + cols
        cm = c < H
        m = rmask[:, None] & cm[None, :]
        a = tl.load(attn_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
        wpa = tl.load(wpa_ptr + c, mask=cm, other=0.0).to(tl.float32)
        r = round_bf16(x + round_bf16(a * rstd_a * wpa[None, :], EMU), EMU)
        tl.store(r_ptr + r64 + c[None, :], r.to(tl.bfloat16), mask=m)
        sq_r += tl.sum(r * r, axis=1)
    rstd_r = _rstd(sq_r, H, eps)[:, None]

    amax1 = tl.zeros((BM,), tl.float32)
    amax2 = tl.zeros((BM,), tl.float32)
    logits = tl.zeros((BM, E_PAD), tl.float32)
    for k in range(0, H, BK):
        c = k + cols
        cm = c < H
        m = rmask[:, None] & cm[None, :]
        a = tl.load(attn_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
        wpa = tl.load(wpa_ptr + c, mask=cm, other=0.0).to(tl.float32)
        r = round_bf16(x + round_bf16(a * rstd_a * wpa[None, :], EMU), EMU)  # pass 2's r, bit for bit
        rn = r * rstd_r
        n1 = round_bf16(rn * tl.load(wff_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
        n2 = round_bf16(rn * tl.load(wff2_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
        amax1 = tl.maximum(amax1, tl.max(tl.abs(n1), axis=1))
        amax2 = tl.maximum(amax2, tl.max(tl.abs(n2), axis=1))
        if Y1:
            tl.store(y1_ptr + r64 + c[None, :], n1.to(tl.bfloat16), mask=m)
        if Y2:
            tl.store(y2_ptr + r64 + c[None, :], n2.to(tl.bfloat16), mask=m)
        # router input, as model.Ops.route rounds it: bf16(bf16(bf16(r * rstd) * scale) * H^-0.5)
        rs = tl.load(rscale_ptr + c, mask=cm, other=0.0).to(tl.float32)
        z = round_bf16(round_bf16(round_bf16(rn, EMU) * rs[None, :], EMU) * root, EMU)
        p = proj_desc.load([0, k]).T  # [BK, E_PAD]; rows >= E and columns >= H arrive as zeros
        if EMU:  # the interpreter keeps bf16 as raw bits: an fp32 dot of the same (bf16-exact) values
            logits = tl.dot(z, p.to(tl.float32), logits, input_precision="ieee")
        else:
            logits = tl.dot(z.to(tl.bfloat16), p, logits)

    if Q1 or Q2:
        s1 = row_scale(amax1)
        s2 = row_scale(amax2)
        for k in range(0, H, BK):
            c = k + cols
            cm = c < H
            m = rmask[:, None] & cm[None, :]
            a = tl.load(attn_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + r64 + c[None, :], mask=m, other=0.0).to(tl.float32)
            wpa = tl.load(wpa_ptr + c, mask=cm, other=0.0).to(tl.float32)
            rn = round_bf16(x + round_bf16(a * rstd_a * wpa[None, :], EMU), EMU) * rstd_r
            if Q1:
                n1 = round_bf16(rn * tl.load(wff_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
                _quant_store(q1_ptr, r64 + c[None, :], n1, s1, m, EMU)
            if Q2:
                n2 = round_bf16(rn * tl.load(wff2_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
                _quant_store(q2_ptr, r64 + c[None, :], n2, s2, m, EMU)
        if Q1:
            tl.store(s1_ptr + rows, s1, mask=rmask)
        if Q2:
            tl.store(s2_ptr + rows, s2, mask=rmask)

    # routing: softmax over the bf16 logits in fp32, top-k by repeated argmax (ties -> lowest expert id)
    logits = tl.where((experts < E)[None, :], round_bf16(logits, EMU), float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    prob = e / tl.sum(e, axis=1)[:, None]
    prob = tl.where((experts < E)[None, :], prob, -1.0)
    kcol = tl.arange(0, K_PAD)
    top_p = tl.zeros((BM, K_PAD), tl.float32)
    top_i = tl.zeros((BM, K_PAD), tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(prob, axis=1)
        idx = tl.min(tl.where(prob == best[:, None], experts[None, :], E_PAD), axis=1)
        top_p = tl.where(kcol[None, :] == j, best[:, None], top_p)
        top_i = tl.where(kcol[None, :] == j, idx[:, None], top_i)
        prob = tl.where(experts[None, :] == idx[:, None], -1.0, prob)
    kmask = kcol[None, :] < TOP_K
    w = top_p / tl.sum(tl.where(kmask, top_p, 0.0), axis=1)[:, None]
    w = w * tl.load(pes_ptr + top_i, mask=kmask, other=0.0).to(tl.float32)
    out = rows[:, None] * TOP_K + kcol[None, :]
    tl.store(tw_ptr + out, w, mask=rmask[:, None] & kmask)
    tl.store(ti_ptr + out, top_i, mask=rmask[:, None] & kmask)


@triton.jit
def _post_ffn_kernel(r_ptr, h1_ptr, h2_ptr, w1_ptr, w2_ptr, w_ptr, scalar_ptr, wn_ptr, out_ptr, q_ptr, s_ptr, y_ptr,
                     T, H, eps, HAS_H2: tl.constexpr, NEXT_Q: tl.constexpr, NEXT_Y: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_H: tl.constexpr, EMU: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_H)
    cm = c < H
    m = (rows < T)[:, None] & cm[None, :]
    off = rows.to(tl.int64)[:, None] * H + c[None, :]
    h1 = tl.load(h1_ptr + off, mask=m, other=0.0).to(tl.float32)
    n = round_bf16(h1 * _rstd(tl.sum(h1 * h1, axis=1), H, eps)[:, None]
                   * tl.load(w1_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
    if HAS_H2:
        h2 = tl.load(h2_ptr + off, mask=m, other=0.0).to(tl.float32)
        n2 = round_bf16(h2 * _rstd(tl.sum(h2 * h2, axis=1), H, eps)[:, None]
                        * tl.load(w2_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
        n = round_bf16(n + n2, EMU)
    n = round_bf16(n * _rstd(tl.sum(n * n, axis=1), H, eps)[:, None]
                   * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
    r = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
    out = round_bf16(round_bf16(r + n, EMU) * tl.load(scalar_ptr).to(tl.float32), EMU)
    tl.store(out_ptr + off, out.to(tl.bfloat16), mask=m)
    if NEXT_Q or NEXT_Y:  # the next layer's input_layernorm (or the final norm)
        y = round_bf16(out * _rstd(tl.sum(out * out, axis=1), H, eps)[:, None]
                       * tl.load(wn_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], EMU)
        if NEXT_Y:
            tl.store(y_ptr + off, y.to(tl.bfloat16), mask=m)
        if NEXT_Q:
            s = row_scale(tl.max(tl.abs(y), axis=1))
            _quant_store(q_ptr, off, y, s, m, EMU)
            tl.store(s_ptr + rows, s, mask=rows < T)


# -- configs ----------------------------------------------------------------------------------------------------------
# Untuned defaults. post_attention: 16-row blocks (the router dot's minimum) keep T/16 programs (16 at batch 1: the
# kernel is latency-, not bandwidth-bound there; see the closing notes); post_ffn: one row per program, H = 2816 in
# registers (BLOCK_H 4096, 8 warps: 16 values per thread per tensor).
configs.register(POST_ATTENTION, {fam: [(4096, Config(block_m=16, block_k=64, num_warps=4, num_stages=1))]
                                  for fam in (90, 100, 120)})
configs.register(POST_FFN, {fam: [(4096, Config(block_m=1, num_warps=8, num_stages=1))] for fam in (90, 100, 120)}
                 | {0: [(4096, Config(block_m=16, num_warps=8, num_stages=1))]})  # interpreter: it pays per program


# -- launchers --------------------------------------------------------------------------------------------------------
_empty = torch.empty  # every output is allocated here (the tests poison them with NaN)


@dataclass
class PostAttention:
    """post_attention's outputs. ff/ff2: (e4m3 [T,H], fp32 [T,1]) when quantised, else None; *_bf16 when asked."""
    r: torch.Tensor  # bf16 [T,H], the residual the FFN adds back
    ff: tuple[torch.Tensor, torch.Tensor] | None
    ff2: tuple[torch.Tensor, torch.Tensor] | None
    ff_bf16: torch.Tensor | None
    ff2_bf16: torch.Tensor | None
    weights: torch.Tensor  # fp32 [T, top_k]
    experts: torch.Tensor  # int32 [T, top_k]


def post_attention(x, attn_out, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, router_proj, per_expert_scale,
                   top_k: int, eps: float = 1e-6, *, quant_ff: bool = True, quant_ff2: bool = True,
                   ff_bf16: bool = False, ff2_bf16: bool = False, config: Config | None = None) -> PostAttention:
    """x, attn_out bf16 [..., H] (residual in, o_proj out); weights as model.Layer / model.Router hold them."""
    h = x.shape[-1]
    x2, a2 = x.reshape(-1, h).contiguous(), attn_out.reshape(-1, h).contiguous()
    t, e = x2.shape[0], router_proj.shape[0]
    dev = x.device
    cfg = config or configs.lookup(POST_ATTENTION, device_cc(dev), t)
    r = _empty(t, h, dtype=torch.bfloat16, device=dev)
    q1 = _empty(t, h, dtype=torch.float8_e4m3fn, device=dev) if quant_ff else None
    s1 = _empty(t, 1, dtype=torch.float32, device=dev) if quant_ff else None
    q2 = _empty(t, h, dtype=torch.float8_e4m3fn, device=dev) if quant_ff2 else None
    s2 = _empty(t, 1, dtype=torch.float32, device=dev) if quant_ff2 else None
    y1 = _empty(t, h, dtype=torch.bfloat16, device=dev) if ff_bf16 else None
    y2 = _empty(t, h, dtype=torch.bfloat16, device=dev) if ff2_bf16 else None
    tw = _empty(t, top_k, dtype=torch.float32, device=dev)
    ti = _empty(t, top_k, dtype=torch.int32, device=dev)
    e_pad = max(16, triton.next_power_of_2(e))
    _post_attention_kernel[(triton.cdiv(t, cfg.block_m),)](
        x2, a2, w_post_attn, w_pre_ff, w_pre_ff2, router_scale,
        tma_desc(router_proj.contiguous(), [e_pad, cfg.block_k]), per_expert_scale, r,
        *(v if v is not None else r for v in (q1, s1, y1, q2, s2, y2)), tw, ti, t, h, e, float(eps), h ** -0.5,
        Q1=quant_ff, Y1=ff_bf16, Q2=quant_ff2, Y2=ff2_bf16, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
        E_PAD=e_pad, BM=cfg.block_m, BK=cfg.block_k, EMU=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return PostAttention(r, (q1, s1) if quant_ff else None, (q2, s2) if quant_ff2 else None, y1, y2, tw, ti)


def post_ffn(r, h1, h2, w_ffn1, w_ffn2, w_ffn, scalar, eps: float = 1e-6, *, next_norm=None, next_quant: bool = True,
             next_bf16: bool = False, config: Config | None = None):
    """r, h1 (dense MLP out), h2 (MoE out, or None) bf16 [..., H]; scalar bf16 [1] -> out bf16 [T,H], plus with
    next_norm the next layer's input_layernorm(out): (e4m3, fp32 [T,1]) if next_quant, bf16 if next_bf16."""
    hsz = r.shape[-1]
    r2, h12 = r.reshape(-1, hsz).contiguous(), h1.reshape(-1, hsz).contiguous()
    h22 = h2.reshape(-1, hsz).contiguous() if h2 is not None else h12
    t, dev = r2.shape[0], r.device
    cfg = config or configs.lookup(POST_FFN, device_cc(dev), t)
    out = _empty(t, hsz, dtype=torch.bfloat16, device=dev)
    nq = next_norm is not None and next_quant
    ny = next_norm is not None and next_bf16
    q = _empty(t, hsz, dtype=torch.float8_e4m3fn, device=dev) if nq else None
    s = _empty(t, 1, dtype=torch.float32, device=dev) if nq else None
    y = _empty(t, hsz, dtype=torch.bfloat16, device=dev) if ny else None
    _post_ffn_kernel[(triton.cdiv(t, cfg.block_m),)](
        r2, h12, h22, w_ffn1, w_ffn2 if w_ffn2 is not None else w_ffn1, w_ffn, scalar,
        next_norm if next_norm is not None else w_ffn, out, *(v if v is not None else out for v in (q, s, y)),
        t, hsz, float(eps), HAS_H2=h2 is not None, NEXT_Q=nq, NEXT_Y=ny, ROWS=cfg.block_m,
        BLOCK_H=triton.next_power_of_2(hsz), EMU=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if next_norm is None:
        return out
    nxt = ((q, s),) if nq else ()
    return (out, *nxt, y) if ny else (out, *nxt)


# -- torch references -------------------------------------------------------------------------------------------------
def post_attention_ref(x, attn_out, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, router_proj, per_expert_scale,
                       top_k, eps=1e-6):
    """(r, (q1, s1, n1), (q2, s2, n2), weights, experts) with the kernel's arithmetic and tie order."""
    h = x.shape[-1]
    x2, a2 = x.reshape(-1, h).float(), attn_out.reshape(-1, h)
    r = bf16r(x2 + rms_norm_ref(a2, w_post_attn, eps))
    n1, n2 = rms_norm_ref(r, w_pre_ff, eps), rms_norm_ref(r, w_pre_ff2, eps)
    z = bf16r(bf16r(rms_norm_ref(r, None, eps) * router_scale.float()) * h ** -0.5)
    logits = bf16r(z @ router_proj.float().t())
    prob = torch.softmax(logits, -1)
    # stable descending sort: equal probabilities keep ascending expert order
    order = torch.sort(-prob, dim=-1, stable=True).indices[:, :top_k]
    w = prob.gather(-1, order)
    w = w / w.sum(-1, keepdim=True) * per_expert_scale.float()[order]
    return r, (*quant_rows_ref(n1), n1), (*quant_rows_ref(n2), n2), w, order.int()


def post_ffn_ref(r, h1, h2, w_ffn1, w_ffn2, w_ffn, scalar, eps=1e-6, next_norm=None):
    hsz = r.shape[-1]
    n = rms_norm_ref(h1.reshape(-1, hsz), w_ffn1, eps)
    if h2 is not None:
        n = bf16r(n + rms_norm_ref(h2.reshape(-1, hsz), w_ffn2, eps))
    out = bf16r(bf16r(r.reshape(-1, hsz).float() + rms_norm_ref(n, w_ffn, eps)) * scalar.float())
    if next_norm is None:
        return out, None
    y = rms_norm_ref(out, next_norm, eps)
    return out, (*quant_rows_ref(y), y)


# -- AOT --------------------------------------------------------------------------------------------------------------
PRODUCTION = dict(H=2816, E=128, TOP_K=8)


def aot_specs() -> list[aot.AotSpec]:
    out = []
    sig = {n: "*bf16" for n in ("x_ptr", "attn_ptr", "wpa_ptr", "wff_ptr", "wff2_ptr", "rscale_ptr", "proj_desc",
                                "pes_ptr", "r_ptr")}
    sig.update({"q1_ptr": "*fp8e4nv", "s1_ptr": "*fp32", "y1_ptr": "*bf16", "q2_ptr": "*fp8e4nv", "s2_ptr": "*fp32",
                "y2_ptr": "*bf16", "tw_ptr": "*fp32", "ti_ptr": "*i32", "T": "i32", "H": "i32", "E": "i32",
                "eps": "fp32", "root": "fp32"})
    sig.update({n: "constexpr" for n in ("Q1", "Y1", "Q2", "Y2", "TOP_K", "K_PAD", "E_PAD", "BM", "BK", "EMU")})
    for fam, rows, cfg in configs.production(POST_ATTENTION):
        sig["proj_desc"] = f"tensordesc<bf16[{PRODUCTION['E']}, {cfg.block_k}]>"
        const = dict(Q1=True, Y1=False, Q2=True, Y2=False, TOP_K=PRODUCTION["TOP_K"], K_PAD=PRODUCTION["TOP_K"],
                     E_PAD=PRODUCTION["E"], BM=cfg.block_m, BK=cfg.block_k, EMU=False)
        out.append(aot.AotSpec(f"{POST_ATTENTION}/rows<={rows}", _post_attention_kernel, sig, const, fam,
                               cfg.num_warps, cfg.num_stages))
    sig = {n: "*bf16" for n in ("r_ptr", "h1_ptr", "h2_ptr", "w1_ptr", "w2_ptr", "w_ptr", "scalar_ptr", "wn_ptr",
                                "out_ptr")}
    sig.update({"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "T": "i32", "H": "i32", "eps": "fp32"})
    sig.update({n: "constexpr" for n in ("HAS_H2", "NEXT_Q", "NEXT_Y", "ROWS", "BLOCK_H", "EMU")})
    for fam, rows, cfg in configs.production(POST_FFN):
        const = dict(HAS_H2=True, NEXT_Q=True, NEXT_Y=False, ROWS=cfg.block_m,
                     BLOCK_H=triton.next_power_of_2(PRODUCTION["H"]), EMU=False)
        out.append(aot.AotSpec(f"{POST_FFN}+next_norm_quant/rows<={rows}", _post_ffn_kernel, sig, const, fam,
                               cfg.num_warps, cfg.num_stages))
    return out
