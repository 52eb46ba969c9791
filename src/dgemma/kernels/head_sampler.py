"""Fused LM head + sampler statistics of one denoising step (docs/kernels.md item 1; spec §9, §11).

Pass 1 (`_head_kernel`): the LM-head GEMM hidden [M = B*C, H] x E^T over vocabulary tiles (bf16, or e4m3 with a
per-token activation scale and a per-vocabulary-row weight scale). Its epilogue rounds the accumulator to bf16 (the
torch path's `F.linear` output dtype), applies the final softcap `tanh(x / 30) * 30` and divides by the step's
temperature (`proc = raw / T`, IEEE division, T read from a device scalar or a per-row [B] tensor: no recompile, no
host sync). It writes per-(row, vocabulary tile) partials only: max, argmax (lowest index on ties), sum e^(x-m),
sum e^(x-m)(x-m), the bf16 softmax sum of the self-conditioning input, and the exponential race of the sample (max of
x - log E over the tile, E ~ Exp(1) from Philox, its id and logit). Besides those it writes bf16(proc) [M, V], the
self-conditioning input the soft embedding needs (`soft_embed`), and with `debug=True` the fp32 proc logits.
`_logits_kernel` is the same epilogue over given fp32 raw logits (backends that produce logits; the tests'
same-logits oracle). Tiles: M = 256*B rows already fill the 64-row MMA dimension, so there is no swap A/B (it pays
below 64 rows); 128 rows x 64 vocabulary ids at 8 warps, row tiles fastest in the program order so each E tile is
fetched from HBM once and served to the other row tiles from L2. 128x128 would halve the reloads of the hidden tile
but the epilogue then needs 64 live logits per thread and spills (measured by the AOT gate).

Pass 2 (`_reduce_kernel`): one reduction over the tiles per position: the argmax token, the entropy
H = log S - W/S (S = sum e^(x-M), W = sum e^(x-M)(x-M); Categorical(logits=proc).entropy() up to rounding), the sampled
token (argmax over tiles of the race), log p of the argmax token (-log S) and of the sampled token (x - M - log S),
and the row's bf16 softmax statistics for the soft embedding.

Equal to the torch path, token for token, given the same fp32 raw logits (`step_from_logits`, or the debug logits of
the GEMM path): the processed logits (bitwise: the same IEEE division), hence the argmax token (lowest index on
ties, as torch.argmax). Acceptance (canvas_step) is equal given the same entropies. Through the GEMM path the logits
themselves differ from torch's by accumulation order (bf16 output rounding can move a logit by one bf16 ulp) and by
the softcap tanh (a few fp32 ulps; no libdevice in the interpreter): argmax equal except near-ties.
Compared with a tolerance: the entropy (another summation order: the tests assert |dH| < 2e-5 nats on the same
logits, measured ~2e-6) and the log-probabilities returned to users: fp32, log p = x - M - log S from fp32 partial
sums, accurate to a few fp32 ulps of |x - M| + log S (asserted < 1e-5 against fp64 log_softmax of the same logits,
measured ~2e-7).
Not equal: the sampled tokens. They come from a Gumbel-max / exponential race (sample = argmax_j x_j - log E_j,
E_j ~ Exp(1), the max over each tile in pass 1, over tiles in pass 2) over a Philox stream keyed by the request's
seed and device step counter (`philox`; one Philox call serves 4 ids), not from torch.multinomial's stream; they
are tested in distribution (chi-square), for reproducibility (same seed and counter -> same tokens, independent of
the tile sizes) and against `sample_ref`, the same arithmetic in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import aot, configs
from .numerics import bf16_rne, device_cc, interpreting, quant_rows_ref, tanh
from .philox import GUMBEL, K_GUMBEL, exponential, exponential_ref, philox4_ref

NF, NI = 6, 2  # float partial fields (m, s, w, sb, race key, race logit), int fields (argmax, race id)
REDUCE_ROWS, REDUCE_TILES = 8, 128  # pass 2: rows per program (coalesced partial reads), tiles per chunk
@triton.jit
def _block_stats(x, rows, cols, grp0, M, b, pos, t, seed, ctr, xb_ptr, dbg_ptr,
                 V: tl.constexpr, WRITE_XB: tl.constexpr, DEBUG: tl.constexpr):
    """Partials of one [rows, cols] block of raw (softcapped) fp32 logits, cols a 4-aligned run starting at
    4 * grp0: proc = x / T (stored as bf16, and as fp32 when DEBUG), then per row max, argmax, sum e^(x-m),
    sum e^(x-m)(x-m), the softmax sum of bf16(proc) and the exponential race."""
    col_ok = cols < V
    x = tl.math.div_rn(x, t[:, None])
    x = tl.where(col_ok[None, :], x, float("-inf"))
    out = rows[:, None] * V + cols[None, :]  # < 2^31: the launcher checks M * V
    ok = (rows < M)[:, None] & col_ok[None, :]
    if DEBUG:
        tl.store(dbg_ptr + out, x, mask=ok)
    xb = bf16_rne(x)
    if WRITE_XB:
        tl.store(xb_ptr + out, xb.to(tl.bfloat16), mask=ok)
    # exponential race: sample = argmax_j (x_j - log E_j), E_j ~ Exp(1). One Philox call per 4 ids: counter
    # (id // 4, position, step, GUMBEL), word id % 4 (a quarter of the work and of the live state per id)
    q4: tl.constexpr = x.shape[1] // 4
    zero = tl.zeros([x.shape[0], q4], tl.uint32)
    grp = (grp0 + tl.arange(0, q4)).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed[:, None], zero + grp[None, :], zero + pos[:, None].to(tl.uint32),
                               zero + ctr[:, None].to(tl.uint32), zero + K_GUMBEL)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), x.shape)  # r[:, 4g + k] = r_k[:, g]
    key = tl.where(col_ok[None, :], x - tl.log(exponential(r)), float("-inf"))
    gk = tl.max(key, 1)
    gi = tl.min(tl.where(key == gk[:, None], cols[None, :], V), 1)
    gx = tl.max(tl.where(cols[None, :] == gi[:, None], x, float("-inf")), 1)
    m = tl.max(x, 1)
    am = tl.min(tl.where(x == m[:, None], cols[None, :], V), 1)
    d = x - m[:, None]
    p = tl.exp(d)
    s = tl.sum(p, 1)
    w = tl.sum(p * tl.where(col_ok[None, :], d, 0.0), 1)  # p = 0 past V
    # softmax sum of bf16(proc), the self-conditioning input (the max of rounded values is the rounded max)
    sb = tl.sum(tl.exp(xb - bf16_rne(m)[:, None]), 1)
    return m, am, s, w, sb, gk, gi, gx


@triton.jit
def _tile_stats(x, rows, pid_n, M, C, temp_ptr, temp_stride, rng_ptr, part_f, part_i, xb_ptr, dbg_ptr,
                V: tl.constexpr, NT: tl.constexpr, WRITE_XB: tl.constexpr, DEBUG: tl.constexpr):
    """Epilogue of one [BLOCK_M, BLOCK_N] tile of raw logits -> its partials."""
    rc = tl.minimum(rows, M - 1)
    b = rc // C
    pos = rc - b * C
    t = tl.load(temp_ptr + b * temp_stride)
    seed = tl.load(rng_ptr + 2 * b)
    ctr = tl.load(rng_ptr + 2 * b + 1)
    bn: tl.constexpr = x.shape[1]
    n0 = pid_n * bn
    m, am, s, w, sb, gk, gi, gx = _block_stats(x, rows, n0 + tl.arange(0, bn), n0 // 4, M, b, pos, t, seed, ctr,
                                               xb_ptr, dbg_ptr, V, WRITE_XB, DEBUG)
    # partials, layout [field, tile, row]: the rows of a tile are contiguous
    row_ok = rows < M
    fs = NT * M
    base = pid_n * M + rows
    tl.store(part_f + base, m, mask=row_ok)
    tl.store(part_f + fs + base, s, mask=row_ok)
    tl.store(part_f + 2 * fs + base, w, mask=row_ok)
    tl.store(part_f + 3 * fs + base, sb, mask=row_ok)
    tl.store(part_f + 4 * fs + base, gk, mask=row_ok)
    tl.store(part_f + 5 * fs + base, gx, mask=row_ok)
    tl.store(part_i + base, am, mask=row_ok)
    tl.store(part_i + fs + base, gi, mask=row_ok)


@triton.jit
def _head_kernel(a_ptr, a_scale_ptr, e_ptr, e_scale_ptr, temp_ptr, temp_stride, rng_ptr, part_f, part_i, xb_ptr,
                 dbg_ptr, M, C, V: tl.constexpr, H: tl.constexpr, NT: tl.constexpr, SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                 WRITE_XB: tl.constexpr, DEBUG: tl.constexpr, INTERP: tl.constexpr):
    """Pass 1: raw = softcap(bf16(hidden @ E^T)) on a [BLOCK_M rows, BLOCK_N vocabulary] tile, then `_tile_stats`."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    ra = tl.minimum(rows, M - 1)  # clamped: loads stay in bounds, the tail is masked at the stores
    ce = tl.minimum(cols, V - 1)
    a_ptrs = a_ptr + ra[:, None] * H + rk[None, :]
    e_ptrs = e_ptr + ce[:, None].to(tl.int64) * H + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs + k)
        e = tl.load(e_ptrs + k)
        if INTERP:  # the interpreter keeps bf16 as raw bits in dot
            a = a.to(tl.float32)
            e = e.to(tl.float32)
        acc = tl.dot(a, tl.trans(e), acc)
    if FP8:
        acc = acc * tl.load(a_scale_ptr + ra)[:, None] * tl.load(e_scale_ptr + ce)[None, :]
    x = bf16_rne(acc)  # the torch path's bf16 GEMM output
    x = tanh(tl.math.div_rn(x, SOFTCAP)) * SOFTCAP
    _tile_stats(x, rows, pid_n, M, C, temp_ptr, temp_stride, rng_ptr, part_f, part_i, xb_ptr, dbg_ptr,
                V, NT, WRITE_XB, DEBUG)


@triton.jit
def _logits_kernel(raw_ptr, temp_ptr, temp_stride, rng_ptr, part_f, part_i, xb_ptr, dbg_ptr, M, C,
                   V: tl.constexpr, NT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   WRITE_XB: tl.constexpr, DEBUG: tl.constexpr):
    """Pass 1 over given raw fp32 logits [M, V] (softcapped already): the same epilogue, no GEMM."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(raw_ptr + tl.minimum(rows, M - 1)[:, None].to(tl.int64) * V + cols[None, :],
                mask=(cols < V)[None, :], other=float("-inf"))
    _tile_stats(x, rows, pid_n, M, C, temp_ptr, temp_stride, rng_ptr, part_f, part_i, xb_ptr, dbg_ptr,
                V, NT, WRITE_XB, DEBUG)


@triton.jit
def _reduce_kernel(part_f, part_i, am_ptr, samp_ptr, ent_ptr, lp_am_ptr, lp_samp_ptr, stats_ptr, M,
                   V: tl.constexpr, NT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pass 2: per position, merge the tile partials (maxima first, then the rescaled sums)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    fs = NT * M
    big = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_m, best_k, best_x = big, big, big
    best_am = tl.full([BLOCK_R], V, tl.int32)
    best_gi = best_am
    for t0 in range(0, NT, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        idx = ts[:, None] * M + rows[None, :]
        msk = (ts < NT)[:, None] & row_ok[None, :]
        m = tl.load(part_f + idx, mask=msk, other=float("-inf"))
        am = tl.load(part_i + idx, mask=msk, other=V)
        cm = tl.max(m, 0)
        cam = tl.min(tl.where(m == cm[None, :], am, V), 0)
        best_am = tl.where(cm > best_m, cam, tl.where(cm == best_m, tl.minimum(best_am, cam), best_am))
        best_m = tl.maximum(best_m, cm)
        gk = tl.load(part_f + 4 * fs + idx, mask=msk, other=float("-inf"))
        gi = tl.load(part_i + fs + idx, mask=msk, other=V)
        gx = tl.load(part_f + 5 * fs + idx, mask=msk, other=float("-inf"))
        cg = tl.max(gk, 0)
        cgi = tl.min(tl.where(gk == cg[None, :], gi, V), 0)
        cgx = tl.max(tl.where(gi == cgi[None, :], gx, float("-inf")), 0)
        take = cg > best_k  # an equal key in a later chunk has a higher id: keep the earlier one
        best_gi = tl.where(take, cgi, best_gi)
        best_x = tl.where(take, cgx, best_x)
        best_k = tl.maximum(best_k, cg)
    mb = bf16_rne(best_m)
    s_tot = tl.zeros([BLOCK_R], tl.float32)
    w_tot = tl.zeros([BLOCK_R], tl.float32)
    sb_tot = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        idx = ts[:, None] * M + rows[None, :]
        msk = (ts < NT)[:, None] & row_ok[None, :]
        m = tl.load(part_f + idx, mask=msk, other=float("-inf"))
        s = tl.load(part_f + fs + idx, mask=msk, other=0.0)
        w = tl.load(part_f + 2 * fs + idx, mask=msk, other=0.0)
        sb = tl.load(part_f + 3 * fs + idx, mask=msk, other=0.0)
        f = tl.exp(m - best_m[None, :])
        s_tot += tl.sum(s * f, 0)
        w_tot += tl.sum(f * (w + tl.where(msk, m - best_m[None, :], 0.0) * s), 0)  # f = s = w = 0 if masked
        sb_tot += tl.sum(sb * tl.exp(bf16_rne(m) - mb[None, :]), 0)
    log_s = tl.log(s_tot)
    tl.store(am_ptr + rows, best_am.to(tl.int64), mask=row_ok)
    tl.store(samp_ptr + rows, best_gi.to(tl.int64), mask=row_ok)
    tl.store(ent_ptr + rows, log_s - tl.math.div_rn(w_tot, s_tot), mask=row_ok)
    tl.store(lp_am_ptr + rows, -log_s, mask=row_ok)
    tl.store(lp_samp_ptr + rows, best_x - best_m - log_s, mask=row_ok)
    tl.store(stats_ptr + rows, mb, mask=row_ok)
    tl.store(stats_ptr + M + rows, sb_tot, mask=row_ok)


# -- configs ------------------------------------------------------------------------------------------------------
# rows = B*C canvas rows. Defaults sized to each family's shared memory, checked by the AOT gate, not yet tuned on a
# GPU. 128x64 tiles at 8 warps: the epilogue (Philox race + softmax/entropy partials + the bf16 store) keeps 32 logits
# per thread and compiles without spills (~172 registers); 128x128 tiles reach 255 registers and spill with FP8.
_T90 = configs.Config(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4)
_T120 = configs.Config(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)  # ~99 KB of shared memory
configs.register("head_partials", {90: [(2048, _T90)], 100: [(2048, _T90)], 120: [(2048, _T120)]})
configs.register("head_partials_fp8", {90: [(2048, configs.Config(128, 64, 128, num_warps=8, num_stages=4))],
                                       100: [(2048, configs.Config(128, 64, 128, num_warps=8, num_stages=4))],
                                       120: [(2048, configs.Config(128, 64, 128, num_warps=8, num_stages=3))]})
# logits_partials (no GEMM): 32-row tiles; its block_n must equal the head's (the partial buffers' tile count)
configs.register("logits_partials", {fam: [(2048, configs.Config(block_m=32, block_n=64, num_warps=4, num_stages=1))]
                                     for fam in (90, 100, 120)})
CPU_CONFIG = configs.Config(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=1)  # interpreter
for _k in ("head_partials", "head_partials_fp8", "logits_partials"):
    configs.TABLES[_k][0] = [(2048, CPU_CONFIG)]


def pick(kernel: str, rows: int, device) -> configs.Config:
    return configs.lookup(kernel, device_cc(device), rows)


# -- buffers and launchers ---------------------------------------------------------------------------------------
@dataclass
class Partials:
    """Per-step outputs of passes 1 and 2 for M rows (allocated once per batch size: CUDA-graph stable)."""

    part_f: Tensor  # fp32 [NF, NT, M]
    part_i: Tensor  # int32 [NI, NT, M]
    xb: Tensor  # bf16 [M, V]: bf16(proc), the next self-conditioning input (soft_embed normalises it in place)
    argmax: Tensor  # int64 [M]
    sample: Tensor  # int64 [M]
    entropy: Tensor  # fp32 [M], nats
    lp_argmax: Tensor  # fp32 [M], log p(argmax token)
    lp_sample: Tensor  # fp32 [M], log p(sampled token)
    stats: Tensor  # fp32 [2, M]: bf16 max and softmax sum of bf16(proc)
    block_n: int

    @classmethod
    def new(cls, m: int, v: int, block_n: int, device) -> "Partials":
        nt = triton.cdiv(v, block_n)
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return cls(torch.empty(NF, nt, m, **f32), torch.empty(NI, nt, m, dtype=torch.int32, device=device),
                   torch.empty(m, v, dtype=torch.bfloat16, device=device), torch.empty(m, **i64),
                   torch.empty(m, **i64), torch.empty(m, **f32), torch.empty(m, **f32), torch.empty(m, **f32),
                   torch.empty(2, m, **f32), block_n)


def _temp_arg(temp: Tensor) -> tuple[Tensor, int]:
    """A 0-d / [1] device temperature (stride 0) or one per batch row [B]."""
    assert temp.dtype == torch.float32, "temperature must be fp32 (spec §11)"
    return temp, (0 if temp.numel() == 1 else 1)


def _check_rng(rng: Tensor, b: int) -> None:
    assert rng.dtype == torch.int64 and rng.shape == (b, 2) and rng.is_contiguous(), "rng must be int64 [B, 2]"


quant_rows = quant_rows_ref  # per-row e4m3 with an fp32 absmax scale [..., 1] (Fp8Linear's activations)


def head_partials(hidden: Tensor, weight: Tensor, temp: Tensor, rng: Tensor, c: int, out: Partials, *,
                  softcap: float, weight_scale: Tensor | None = None, cfg: configs.Config | None = None,
                  debug: Tensor | None = None) -> None:
    """Pass 1 from normed hidden states [M, H] bf16 and the head weight [V, H] (bf16, or e4m3 with `weight_scale`
    [V]: the activations are then quantised per row here). `debug` [M, V] fp32, if given, receives proc."""
    m, h = hidden.shape
    v = weight.shape[0]
    fp8 = weight.dtype == torch.float8_e4m3fn
    cfg = cfg or pick("head_partials_fp8" if fp8 else "head_partials", m, hidden.device)
    assert h % cfg.block_k == 0 and cfg.block_n == out.block_n and weight.shape[1] == h and v % 16 == 0
    _check_rng(rng, m // c)
    a, a_scale = quant_rows(hidden) if fp8 else (hidden.contiguous(), None)
    if fp8:
        assert weight_scale is not None and weight_scale.shape == (v,)
        a_scale = a_scale.reshape(m).contiguous()
    t, ts = _temp_arg(temp)
    nt = triton.cdiv(v, cfg.block_n)
    grid = (triton.cdiv(m, cfg.block_m) * nt,)
    _head_kernel[grid](a, a_scale if fp8 else t, weight, weight_scale if fp8 else t, t, ts, rng, out.part_f,
                       out.part_i, out.xb, debug if debug is not None else out.part_f, m, c, V=v, H=h, NT=nt,
                       SOFTCAP=float(softcap), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       FP8=fp8, WRITE_XB=True, DEBUG=debug is not None, INTERP=interpreting(),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def logits_partials(raw: Tensor, temp: Tensor, rng: Tensor, c: int, out: Partials, *,
                    cfg: configs.Config | None = None, debug: Tensor | None = None) -> None:
    """Pass 1 from raw (softcapped) fp32 logits [M, V] instead of the GEMM."""
    m, v = raw.shape
    cfg = cfg or pick("logits_partials", m, raw.device)
    assert cfg.block_n == out.block_n and raw.dtype == torch.float32
    _check_rng(rng, m // c)
    t, ts = _temp_arg(temp)
    nt = triton.cdiv(v, cfg.block_n)
    block_m = cfg.block_m
    _logits_kernel[(triton.cdiv(m, block_m) * nt,)](
        raw.contiguous(), t, ts, rng, out.part_f, out.part_i, out.xb, debug if debug is not None else out.part_f,
        m, c, V=v, NT=nt, BLOCK_M=block_m, BLOCK_N=cfg.block_n, WRITE_XB=True, DEBUG=debug is not None,
        num_warps=4)


def reduce_partials(out: Partials) -> None:
    """Pass 2: argmax, entropy, sample, log-probabilities and the soft-embedding statistics per position."""
    m, v = out.xb.shape
    nt = out.part_f.shape[1]
    rows = 64 if interpreting() else REDUCE_ROWS  # the interpreter pays per program, not per element
    _reduce_kernel[(triton.cdiv(m, rows),)](
        out.part_f, out.part_i, out.argmax, out.sample, out.entropy, out.lp_argmax, out.lp_sample, out.stats, m,
        V=v, NT=nt, BLOCK_R=rows, BLOCK_T=REDUCE_TILES, num_warps=4)


# -- torch references (same arithmetic, eager) ---------------------------------------------------------------------
def raw_logits_ref(hidden: Tensor, weight: Tensor, softcap: float, weight_scale: Tensor | None = None) -> Tensor:
    """model.logits after the final norm: bf16 GEMM output (or the FP8 twin's bf16 output), fp32 softcap."""
    if weight.dtype == torch.float8_e4m3fn:
        q, s = quant_rows(hidden)
        x = ((q.float() @ weight.float().t()) * s * weight_scale[None]).to(torch.bfloat16).float()
    else:
        x = torch.nn.functional.linear(hidden, weight).float()
    return torch.tanh(x / softcap) * softcap


def stats_ref(proc: Tensor) -> dict[str, Tensor]:
    """Pass 2's outputs from fp32 proc [M, V] by the formulas the kernels use (S, W partial sums)."""
    m = proc.max(dim=-1, keepdim=True).values
    d = proc - m
    p = torch.exp(d)
    s, w = p.sum(-1), torch.where(torch.isfinite(d), p * d, 0).sum(-1)
    return dict(argmax=torch.argmax(proc, dim=-1), entropy=torch.log(s) - w / s, lp_argmax=-torch.log(s),
                log_s=torch.log(s), max=m.squeeze(-1))


def sample_ref(proc: Tensor, rng: Tensor, c: int) -> Tensor:
    """The exponential race of passes 1/2 in torch: argmax_j proc_j - log E_j with the same Philox counters
    (group j // 4, position, step counter, GUMBEL; word j % 4)."""
    mrows, v = proc.shape
    rows = torch.arange(mrows)
    b = rows // c
    rng = rng.cpu()
    words = philox4_ref(rng[b, 0][:, None], torch.arange(triton.cdiv(v, 4))[None, :], (rows - b * c)[:, None],
                        rng[b, 1][:, None], GUMBEL)
    r = torch.stack(words, dim=-1).reshape(mrows, -1)[:, :v]
    key = proc.cpu() - torch.log(exponential_ref(r))
    return torch.argmax(key, dim=-1).to(proc.device)


# -- AOT ------------------------------------------------------------------------------------------------------------
V_FULL, H_FULL, SOFTCAP_FULL = 262144, 2816, 30.0


def _head_sig(fp8: bool) -> dict[str, str]:
    w = "*fp8e4nv" if fp8 else "*bf16"
    sig = {"a_ptr": w, "a_scale_ptr": "*fp32", "e_ptr": w, "e_scale_ptr": "*fp32", "temp_ptr": "*fp32",
           "temp_stride": "i32", "rng_ptr": "*i64", "part_f": "*fp32", "part_i": "*i32", "xb_ptr": "*bf16",
           "dbg_ptr": "*fp32", "M": "i32", "C": "i32"}
    return sig | {k: "constexpr" for k in ("V", "H", "NT", "SOFTCAP", "BLOCK_M", "BLOCK_N", "BLOCK_K", "FP8",
                                            "WRITE_XB", "DEBUG", "INTERP")}


def aot_specs() -> list[aot.AotSpec]:
    specs = []
    for kernel, fp8 in (("head_partials", False), ("head_partials_fp8", True)):
        for fam, rows, cfg in configs.production(kernel):
            const = dict(V=V_FULL, H=H_FULL, NT=triton.cdiv(V_FULL, cfg.block_n), SOFTCAP=SOFTCAP_FULL,
                         FP8=fp8, WRITE_XB=True, DEBUG=False, INTERP=False, **cfg.constexprs())
            specs.append(aot.AotSpec(f"{kernel}/rows<={rows}/sm{fam}", _head_kernel, _head_sig(fp8), const, fam,
                                     cfg.num_warps, cfg.num_stages, tensor_cores=True))
    nt = triton.cdiv(V_FULL, _T90.block_n)
    red_sig = {"part_f": "*fp32", "part_i": "*i32", "am_ptr": "*i64", "samp_ptr": "*i64", "ent_ptr": "*fp32",
               "lp_am_ptr": "*fp32", "lp_samp_ptr": "*fp32", "stats_ptr": "*fp32", "M": "i32", "V": "constexpr",
               "NT": "constexpr", "BLOCK_R": "constexpr", "BLOCK_T": "constexpr"}
    log_sig = {"raw_ptr": "*fp32", "temp_ptr": "*fp32", "temp_stride": "i32", "rng_ptr": "*i64", "part_f": "*fp32",
               "part_i": "*i32", "xb_ptr": "*bf16", "dbg_ptr": "*fp32", "M": "i32", "C": "i32", "V": "constexpr",
               "NT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "WRITE_XB": "constexpr",
               "DEBUG": "constexpr"}
    for cc in aot.ARCHS:
        specs.append(aot.AotSpec(f"head_reduce/sm{cc}", _reduce_kernel, red_sig,
                                 dict(V=V_FULL, NT=nt, BLOCK_R=REDUCE_ROWS, BLOCK_T=REDUCE_TILES), cc, 4, 1))
    for fam, rows, cfg in configs.production("logits_partials"):
        specs.append(aot.AotSpec(f"logits_partials/sm{fam}", _logits_kernel, log_sig,
                                 dict(V=V_FULL, NT=triton.cdiv(V_FULL, cfg.block_n), BLOCK_M=cfg.block_m,
                                      BLOCK_N=cfg.block_n, WRITE_XB=True, DEBUG=False), fam, cfg.num_warps, 1))
    return specs
