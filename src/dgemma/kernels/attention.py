"""Flash-attention forward of both passes over [valid KV prefix ⊕ new block] (spec §5.3, §6, §7).

Owns the Triton kernels (`_attn_fwd`: online softmax with fp32 accumulation over the keys; `_combine`: the
deterministic merge of split-K partials), the torch reference `attention_ref` (explicit masks, no kernel code), the
launcher `attention`, its launch configs (`configs.register`, kernels "attention_hd256" and "attention_hd512") and
the AOT specs of every production config.

Tensor layout (what `runtime.fast` holds; the head dim must be contiguous, every other stride is free):
- q [B, nh, S, hd]: `Attention.qkv`'s transposed view of [B, S, nh, hd] is read in place.
- k_cache, v_cache [B, kvh, cap, hd]: the fixed-capacity buffers. Full layers hold positions 0..P_b-1 in slots
  0..P_b-1; sliding layers (window W) hold the last min(P_b, W-1) tokens in order at slots 0.. (kvbuf, FastState's
  extended buffer's first W-1 slots). Only the first L_b = min(P_b, W-1 if sliding, cap) slots are read.
- k_new, v_new [B, kvh, S, hd]: the block being encoded / denoised (positions P_b..P_b+S-1); may be views into
  the same extended buffer (slots W-1..W-1+S).
- past_length [B] or [1] (broadcast), int32/int64, on the device: read by the kernel, never by the host, so one
  compiled kernel serves every length and the launch can be captured in a CUDA graph.
- out [B, nh, S, hd], returned as a transposed view of a contiguous [B, S, nh, hd] buffer (o_proj's input layout:
  `out.transpose(1, 2).reshape(B, S, nh * hd)` is free); an `out=` tensor of any strides (hd contiguous) is accepted.

Masks (True = attend; identical to export.encoder_mask / prefix_mask): query j (position P_b+j) sees
- denoiser (causal=False): every valid cache slot and every new key (the same keys for every query);
- encoder (causal=True): every valid cache slot (full) or slot k > L_b + j - W (sliding), and new key k' <= j
  (and k' > j - W when sliding).
A query with no visible key (impossible in these modes) gets 0, not NaN. Softmax scale 1.0 (q/k are RMS-normed).

GQA: query heads sharing a KV head are folded into the rows of one program (row r = g*S + j, head kv*G + g), so
each K/V tile is loaded once for all G heads. The head dim is cut in chunks of BLOCK_D (the config's block_k):
Q·Kᵀ sums over up to two chunks held on chip, and each program owns one BLOCK_D-wide slice of the output (hd 512:
two programs per row block, each recomputing the scores: 1.5x the dot FLOPs, but an fp32 accumulator of
[BLOCK_M, 256] per program instead of [BLOCK_M, 512], 128 registers a thread at BLOCK_M=64 and 8 warps before Q, S
and P). Split-K: program z of `splits` takes a contiguous share of the row block's key tiles; partials (normalised
output, log2-sum-exp) are merged by `_combine` in split order, so results do not depend on scheduling. The grid,
(row blocks x output slices, B x kvh, splits), depends on shapes only; the key loop's bounds come from past_length.

Under the interpreter (UPCAST) every tile is widened to fp32 after its load and P stays fp32, and a bf16 output is
rounded to nearest even with integer arithmetic (the interpreter's cast truncates); compiled, Q/K/V stay bf16 for
the MMAs and P is rounded to bf16 before P·V. Row alignment comes from the JIT's specialisation of aligned pointers
and strides (the AOT gate compiles the same form: aot.spec_attrs).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import aot, configs
from .numerics import device_cc, interpreting, round_bf16

NUM_SMS_DEFAULT = 132  # H100 SXM; the launcher asks the device when there is one


# -- kernels ------------------------------------------------------------------------------------------------------
# One flat kernel without nested @jit helpers: under the interpreter every nested call re-patches triton.language,
# which cost more than the arithmetic.
@triton.jit
def _attn_fwd(Q, KC, VC, KN, VN, PAST, O, OP, LSE,
              sq_b, sq_h, sq_s, skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
              skn_b, skn_h, skn_s, svn_b, svn_h, svn_s, so_b, so_h, so_s, sp,
              S, CAP, KVH, WINDOW, SPLITS,
              G: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    N_QK: tl.constexpr = (HEAD_DIM + BLOCK_D - 1) // BLOCK_D
    tl.static_assert(N_QK <= 2, "head_dim > 2 * BLOCK_D: raise block_k")
    pid = tl.program_id(0)  # row block x output slice
    mb = pid // N_QK
    dv0 = (pid % N_QK) * BLOCK_D
    bh = tl.program_id(1)
    b = bh // KVH
    kv = bh % KVH
    split = tl.program_id(2)
    b64 = b.to(tl.int64)
    kv64 = kv.to(tl.int64)

    # valid cache slots of this batch row, read on the device
    sliding = WINDOW > 0
    L = tl.load(PAST + b * sp).to(tl.int32)
    L = tl.where(sliding, tl.minimum(L, WINDOW - 1), L)
    L = tl.maximum(tl.minimum(L, CAP), 0)

    # folded rows: r = g * S + j is query j of head kv * G + g
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * S
    j = rows % S
    head = (kv * G + rows // S).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b64 * sq_b + (head * sq_h + j * sq_s)[:, None] + d[None, :]
    q0 = tl.load(q_ptrs, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the interpreter mishandles bf16 arithmetic: widen right after every load
        q0 = q0.to(tl.float32)
    if N_QK == 2:
        q1 = tl.load(q_ptrs + BLOCK_D, mask=row_ok[:, None] & (BLOCK_D + d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            q1 = q1.to(tl.float32)

    # key tiles this row block can see: cache slots [c_lo, L), then new keys [n_lo, n_hi)
    if CAUSAL:
        j_lo = tl.min(tl.where(row_ok, j, S), 0)
        j_hi = tl.max(tl.where(row_ok, j, 0), 0)
        n_hi = j_hi + 1
        c_lo = tl.where(sliding, tl.maximum(L + j_lo - WINDOW + 1, 0), 0)
        n_lo = tl.where(sliding, tl.maximum(j_lo - WINDOW + 1, 0), 0)
        w_eff = tl.where(sliding, WINDOW, 1 << 30)
    else:
        n_hi = S
        c_lo = 0
        n_lo = 0
    n_cache = tl.cdiv(tl.maximum(L - c_lo, 0), BLOCK_N)
    n_tiles = n_cache + tl.cdiv(tl.maximum(n_hi - n_lo, 0), BLOCK_N)
    per = tl.cdiv(n_tiles, SPLITS)  # split z takes tiles [z*per, (z+1)*per): contiguous, deterministic
    t0 = split * per
    t1 = tl.minimum(t0 + per, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kc_base = KC + b64 * skc_b + kv64 * skc_h
    vc_base = VC + b64 * svc_b + kv64 * svc_h
    kn_base = KN + b64 * skn_b + kv64 * skn_h
    vn_base = VN + b64 * svn_b + kv64 * svn_h
    for t in range(t0, t1):
        in_cache = t < n_cache
        idx = tl.where(in_cache, c_lo + t * BLOCK_N, n_lo + (t - n_cache) * BLOCK_N) + tl.arange(0, BLOCK_N)
        key_ok = idx < tl.where(in_cache, L, n_hi)
        k_ptrs = tl.where(in_cache, kc_base, kn_base) + (idx * tl.where(in_cache, skc_s, skn_s))[:, None] + d[None, :]
        v_ptrs = (tl.where(in_cache, vc_base, vn_base) + (idx * tl.where(in_cache, svc_s, svn_s))[:, None]
                  + (dv0 + d)[None, :])
        k = tl.load(k_ptrs, mask=key_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q0, tl.trans(k), input_precision=DOT_PRECISION)
        if N_QK == 2:
            k = tl.load(k_ptrs + BLOCK_D, mask=key_ok[:, None] & (BLOCK_D + d[None, :] < HEAD_DIM), other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s += tl.dot(q1, tl.trans(k), input_precision=DOT_PRECISION)
        if CAUSAL:  # positions relative to P: cache slot k -> k - L (< 0), new key k' -> k'; query j -> j
            kpos = tl.where(in_cache, idx - L, idx)
            vis = key_ok[None, :] & (kpos[None, :] <= j[:, None]) & (kpos[None, :] > j[:, None] - w_eff)
        else:  # the denoiser sees every valid key
            vis = key_ok[None, :]
        s = tl.where(vis, s * 1.4426950408889634, float("-inf"))  # scale 1.0; log2 domain for exp2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: stay at 0, not NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v = tl.load(v_ptrs, mask=key_ok[:, None] & (dv0 + d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    # rows that saw nothing (an empty split; no visible key) write 0 with weight 0 (lse = -inf)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    dcol = dv0 + d
    st_mask = row_ok[:, None] & (dcol[None, :] < HEAD_DIM)
    if SPLITS == 1:  # runtime branch: one compiled kernel serves both output paths
        if O.dtype.element_ty == tl.bfloat16:  # round to nearest even (the interpreter's own cast truncates)
            o = round_bf16(o, UPCAST)
        o_ptrs = O + b64 * so_b + (head * so_h + j * so_s)[:, None] + dcol[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=st_mask)
    else:
        part = (split * tl.num_programs(1) + bh).to(tl.int64) * (G * S) + rows
        tl.store(OP + part[:, None] * HEAD_DIM + dcol[None, :], o, mask=st_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(LSE + part, lse, mask=row_ok & (dv0 == 0))  # one writer per row


@triton.jit
def _combine(OP, LSE, O, so_b, so_h, so_s, S, KVH, NBH, SPLITS,
             G: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """out = Σ_z 2^(lse_z - M) o_z / Σ_z 2^(lse_z - M), splits in order (deterministic); 0 where all are empty."""
    N_DV: tl.constexpr = (HEAD_DIM + BLOCK_D - 1) // BLOCK_D
    pid = tl.program_id(0)
    mb = pid // N_DV
    dcol = (pid % N_DV) * BLOCK_D + tl.arange(0, BLOCK_D)
    bh = tl.program_id(1)
    b = bh // KVH
    kv = bh % KVH
    R = G * S
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for z in range(SPLITS):
        m = tl.maximum(m, tl.load(LSE + (z * NBH + bh).to(tl.int64) * R + rows, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    wsum = tl.zeros([BLOCK_M], tl.float32)
    msk = row_ok[:, None] & (dcol[None, :] < HEAD_DIM)
    for z in range(SPLITS):
        part = (z * NBH + bh).to(tl.int64) * R + rows
        w = tl.exp2(tl.load(LSE + part, mask=row_ok, other=float("-inf")) - m)
        acc += w[:, None] * tl.load(OP + part[:, None] * HEAD_DIM + dcol[None, :], mask=msk, other=0.0)
        wsum += w
    o = acc / tl.where(wsum > 0.0, wsum, 1.0)[:, None]
    if O.dtype.element_ty == tl.bfloat16:
        o = round_bf16(o, UPCAST)
    head = (kv * G + rows // S).to(tl.int64)
    o_ptrs = O + b.to(tl.int64) * so_b + head[:, None] * so_h + (rows % S)[:, None] * so_s + dcol[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=msk)


# -- torch reference ------------------------------------------------------------------------------------------------
def attention_ref(q, k_cache, v_cache, k_new, v_new, past_length, causal: bool, window: int | None = None,
                  dtype=torch.float64):
    """The same attention written plainly: per batch row, keys = valid cache slots ⊕ new keys with their absolute
    positions, an explicit boolean mask, softmax in `dtype`, GQA by repeating K/V. Rows that see nothing -> 0.

    Shares no code with the kernel; the oracle of the tests and a slow fallback."""
    b_, nh, s, _ = q.shape
    kvh, cap = k_cache.shape[1], k_cache.shape[2]
    g = nh // kvh
    lengths = past_length.reshape(-1).tolist()
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for b in range(b_):
        p = int(lengths[b if len(lengths) > 1 else 0])
        n = min(p, window - 1) if window else p
        n = max(min(n, cap), 0)
        k = torch.cat([k_cache[b, :, :n], k_new[b]], dim=1).to(dtype).repeat_interleave(g, dim=0)
        v = torch.cat([v_cache[b, :, :n], v_new[b]], dim=1).to(dtype).repeat_interleave(g, dim=0)
        q_pos = torch.arange(p, p + s)[:, None]
        k_pos = torch.cat([torch.arange(p - n, p), torch.arange(p, p + s)])[None, :]
        if causal:
            mask = k_pos <= q_pos
            if window:
                mask &= k_pos > q_pos - window
        else:  # denoiser: every query sees every valid cache slot and the whole block (spec §7)
            mask = torch.ones(s, n + s, dtype=torch.bool)
        scores = q[b].to(dtype) @ k.transpose(-1, -2)  # scale 1.0
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
        w = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[b] = w @ v
    return out


# -- launch configs -------------------------------------------------------------------------------------------------
# block_m: folded query rows per program; block_n: keys per tile; block_k: head-dim chunk (Q·Kᵀ chunk and output
# slice); split_k: most key splits the launcher may use (it picks fewer when the grid already fills the GPU).
# Buckets are query tokens per call: <= 256 (denoise step, commit) and anything larger (prefill).
_C = configs.Config


def _buckets(**tiles) -> list[tuple[int, configs.Config]]:
    return [(256, _C(split_k=8, **tiles)), (1 << 30, _C(split_k=1, **tiles))]


# Defaults that fit each architecture (AOT gate: no spills, shared memory within aot.SMEM_LIMIT); not yet timed on a
# GPU. 8 warps on SM90/100 because a [64, 256] fp32 accumulator plus the score tile spill at 4; SM120 has a third
# of the shared memory (Q tile + 2 K/V stages) and keeps mma.sync operands in registers, hence 32-row blocks.
TABLE_HD256 = {
    90: _buckets(block_m=64, block_n=64, block_k=256, num_warps=8, num_stages=2),
    100: _buckets(block_m=64, block_n=64, block_k=256, num_warps=8, num_stages=2),
    120: _buckets(block_m=32, block_n=32, block_k=256, num_warps=4, num_stages=2),
}
TABLE_HD512 = {
    90: _buckets(block_m=64, block_n=32, block_k=256, num_warps=8, num_stages=2),
    100: _buckets(block_m=64, block_n=32, block_k=256, num_warps=8, num_stages=2),
    120: _buckets(block_m=32, block_n=32, block_k=256, num_warps=4, num_stages=2),
}
configs.register("attention_hd256", TABLE_HD256)
configs.register("attention_hd512", TABLE_HD512)
COMBINE_BLOCK_M = 32


def table_name(head_dim: int) -> str:
    """Sliding layers (hd 256) and full layers (hd 512) have their own tables; smaller test dims use hd256's."""
    return "attention_hd256" if head_dim <= 256 else "attention_hd512"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


def pick_splits(cfg: configs.Config, programs: int, max_keys: int, num_sms: int) -> int:
    """Static split count (from shapes only, so a captured graph stays valid for every length): enough programs
    for about two waves, at most cfg.split_k, and at least two key tiles per split at the longest key span."""
    want = -(-2 * num_sms // max(programs, 1))
    return max(1, min(want, cfg.split_k, -(-max_keys // (2 * cfg.block_n))))


# -- launcher -------------------------------------------------------------------------------------------------------
def attention(q, k_cache, v_cache, k_new, v_new, past_length, causal: bool, window: int | None = None, *,
              out=None, splits: int | None = None, config: configs.Config | None = None):
    """Attention of S new queries over [valid cache prefix ⊕ S new keys] -> out [B, nh, S, hd] in q's dtype.

    Layouts and masks: module docstring. `window` = W for sliding layers (cache holds min(P, W-1) slots), None for
    full layers. `splits` / `config` override the table (tests); by default the config comes from
    configs.lookup(table_name(hd), cc, S) and the split count from `pick_splits`.
    """
    b, nh, s, hd = q.shape
    kvh, cap = k_cache.shape[1], k_cache.shape[2]
    if nh % kvh:
        raise ValueError(f"{nh} query heads are not a multiple of {kvh} KV heads")
    for name, t, shape in (("k_cache", k_cache, (b, kvh, cap, hd)), ("v_cache", v_cache, (b, kvh, cap, hd)),
                           ("k_new", k_new, (b, kvh, s, hd)), ("v_new", v_new, (b, kvh, s, hd))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype}, q is {q.dtype}")
    if past_length.numel() not in (1, b) or past_length.dtype not in (torch.int32, torch.int64):
        raise ValueError("past_length must be an int32/int64 tensor of B (or 1) elements")
    if out is None:
        out = torch.empty(b, s, nh, hd, dtype=q.dtype, device=q.device).transpose(1, 2)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new),
                    ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the head dim (stride {t.stride(-1)})")
    g = nh // kvh
    cfg = config or configs.lookup(table_name(hd), device_cc(q.device), s)
    bd = cfg.block_k
    n_dv = -(-hd // bd)
    if n_dv > 2:
        raise ValueError(f"head_dim {hd} needs block_k >= {-(-hd // 2)} (config has {bd})")
    row_blocks = -(-(g * s) // cfg.block_m)
    max_keys = (min(cap, window - 1) if window else cap) + s
    if splits is None:
        splits = pick_splits(cfg, row_blocks * n_dv * b * kvh, max_keys, _num_sms(q.device))
    past = past_length.reshape(-1)
    interp = interpreting()
    if splits > 1:
        op = torch.empty(splits, b * kvh, g * s, hd, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, b * kvh, g * s, dtype=torch.float32, device=q.device)
    else:
        op = lse = out  # unused
    grid = (row_blocks * n_dv, b * kvh, splits)
    _attn_fwd[grid](
        q, k_cache, v_cache, k_new, v_new, past, out, op, lse,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3],
        *k_new.stride()[:3], *v_new.stride()[:3], out.stride(0), out.stride(1), out.stride(2),
        past.stride(0) if past.numel() > 1 else 0,
        s, cap, kvh, int(window or 0), splits,
        G=g, HEAD_DIM=hd, CAUSAL=bool(causal), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=bd, UPCAST=interp, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **({} if interp else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    if splits > 1:
        grid = (-(-(g * s) // COMBINE_BLOCK_M) * n_dv, b * kvh)
        _combine[grid](op, lse, out, out.stride(0), out.stride(1), out.stride(2), s, kvh, b * kvh, splits,
                       G=g, HEAD_DIM=hd, BLOCK_M=COMBINE_BLOCK_M, BLOCK_D=bd, UPCAST=interp)
    return out


# -- ahead-of-time specs --------------------------------------------------------------------------------------------
# production shapes (spec §2): sliding layers hd 256 with 8 KV heads (G = 2), full layers hd 512 with 2 (G = 8)
PRODUCTION = {256: 2, 512: 8}
# production strides (head dims 256 / 512, every other stride a product of them) and S (the 256-token canvas, the
# 256-token prefill chunks) are multiples of 16: the JIT specialises them so (aot.spec_attrs)
_DIVISIBLE = ("sq_b", "sq_h", "sq_s", "skc_b", "skc_h", "skc_s", "svc_b", "svc_h", "svc_s", "skn_b", "skn_h", "skn_s",
              "svn_b", "svn_h", "svn_s", "so_b", "so_h", "so_s", "S")
_INT_ARGS = ("sq_b", "sq_h", "sq_s", "skc_b", "skc_h", "skc_s", "svc_b", "svc_h", "svc_s", "skn_b", "skn_h", "skn_s",
             "svn_b", "svn_h", "svn_s", "so_b", "so_h", "so_s", "sp", "S", "CAP", "KVH", "WINDOW", "SPLITS")


def _fwd_signature(dtype: str = "bf16") -> dict[str, str]:
    sig = {n: f"*{dtype}" for n in ("Q", "KC", "VC", "KN", "VN")}
    sig.update(PAST="*i64", O=f"*{dtype}", OP="*fp32", LSE="*fp32")
    sig.update({n: "i32" for n in _INT_ARGS})
    sig.update({n: "constexpr" for n in ("G", "HEAD_DIM", "CAUSAL", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                                         "UPCAST", "DOT_PRECISION")})
    return sig


def _combine_signature(dtype: str = "bf16") -> dict[str, str]:
    sig = {"OP": "*fp32", "LSE": "*fp32", "O": f"*{dtype}"}
    sig.update({n: "i32" for n in ("so_b", "so_h", "so_s", "S", "KVH", "NBH", "SPLITS")})
    sig.update({n: "constexpr" for n in ("G", "HEAD_DIM", "BLOCK_M", "BLOCK_D", "UPCAST")})
    return sig


def _tiles(cfg: configs.Config) -> tuple:
    return cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages


def aot_specs() -> list[aot.AotSpec]:
    """Every production launch of bf16 attention: per architecture, head dim (with its GQA group), mode
    (denoiser bidirectional / encoder causal) and distinct tile config; the split-K merge per head dim. Buckets with
    the same tiles share one spec (its label lists them). Forward configs must use the tensor cores."""
    specs: dict[tuple, tuple[list[str], aot.AotSpec]] = {}
    for hd, g in PRODUCTION.items():
        for fam, bucket, cfg in configs.production(table_name(hd)):
            served = "S<=256" if bucket <= 256 else "S>256"
            for causal in (False, True):
                if not causal and bucket > 256:
                    continue  # the denoiser only ever runs a 256-token canvas
                key = (fam, hd, causal, _tiles(cfg))
                consts = dict(G=g, HEAD_DIM=hd, CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              BLOCK_D=cfg.block_k, UPCAST=False, DOT_PRECISION="tf32")
                spec = aot.AotSpec("", _attn_fwd, _fwd_signature(), consts, fam, cfg.num_warps, cfg.num_stages,
                                   tensor_cores=True, divisible=_DIVISIBLE)
                specs.setdefault(key, ([], spec))[0].append(served)
            if cfg.split_k > 1:
                consts = dict(G=g, HEAD_DIM=hd, BLOCK_M=COMBINE_BLOCK_M, BLOCK_D=cfg.block_k, UPCAST=False)
                spec = aot.AotSpec("", _combine, _combine_signature(), consts, fam, 4, 1,
                                   divisible=("so_b", "so_h", "so_s", "S"))
                specs.setdefault((fam, hd, "combine", cfg.block_k), ([], spec))[0].append(served)
    out = []
    for key, (served, spec) in specs.items():
        fam, hd, what = key[0], key[1], key[2]
        if what == "combine":
            label = f"combine/hd{hd}"
        else:
            label = f"attn/hd{hd}/{'causal' if what else 'bidir'}"
        label += f"/{'+'.join(dict.fromkeys(served))}/sm{fam}"
        out.append(dataclasses.replace(spec, label=label))
    return out
