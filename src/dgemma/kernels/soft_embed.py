"""The next self-conditioning soft embedding s = bf16(softmax_fp32(bf16(proc))) @ E * bf16(sqrt(H)) (spec §7, §11).

Input: the bf16(proc) buffer [M, V] that the head pass writes and the row statistics of pass 2 (bf16 max and the
softmax sum of bf16(proc)). `_probs_kernel` normalises it in place, p = bf16(e^(x - max) / sum) (or, with an e4m3
soft-embedding weight, writes e4m3 p with the per-row scale of runtime.fast's Fp8Linear: the row's largest
probability is bf16(1 / sum), known without another pass). `_soft_kernel` is the GEMM p [M, V] x E [V, H] split
over the vocabulary (K = V) into SPLIT slices, fp32 partials [SPLIT, M, H]; `_finish_kernel` sums the slices in a
fixed order (deterministic, no atomics), rounds to bf16 (the torch matmul's output), multiplies by bf16(sqrt(H)) in
bf16 and writes only rows whose canvas is not frozen (`done`), in place over the previous soft embedding.

Why a bf16 buffer and not a recomputing GEMM (full size, B = 1, bf16 E 1.48 GB): the soft GEMM must stream E once
more in either design (its K dimension is the vocabulary; the normaliser is known only after pass 2). Recomputing
the logits tile instead of storing bf16(proc) would add a second read of E (1.48 GB) and a second head GEMM
(378 GFLOP), and each vocabulary slice would have to leave an [M, H] fp32 partial for a split-K reduction. The buffer
costs 134 MB written by pass 1, 134 MB read + 134 MB written by the normalisation, 134 MB read by the GEMM: 0.54 GB,
a third of one E read, and the GEMM's A operand needs no exp/div in its K loop (it would be recomputed for each of
the H / BLOCK_H = 22 output column tiles otherwise). Numerics: equal to model.soft_embed up to the bf16 rounding of
probabilities whose fp32 value lies within an ulp of a bf16 rounding boundary and the GEMM's summation order
(compared with a tolerance in the tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import aot, configs
from .head_sampler import H_FULL, V_FULL
from .numerics import E4M3_MAX_C, bf16_rne, device_cc, interpreting, quant_rows_ref, to_e4m3

PROBS_ROWS, PROBS_COLS = 8, 512  # normalisation block
FINISH_BLOCK = 1024


@triton.jit
def _probs_kernel(xb_ptr, stats_ptr, q_ptr, qscale_ptr, M, V: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_V: tl.constexpr, FP8: tl.constexpr):
    """p = bf16(exp(x - max) / sum) over a [BLOCK_R, BLOCK_V] block, in place (bf16) or as e4m3 into q_ptr."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rok = rows < M
    ok = rok[:, None] & (cols < V)[None, :]
    off = rows[:, None].to(tl.int64) * V + cols[None, :]
    x = tl.load(xb_ptr + off, mask=ok, other=float("-inf")).to(tl.float32)
    mb = tl.load(stats_ptr + rows, mask=rok, other=0.0)
    sb = tl.load(stats_ptr + M + rows, mask=rok, other=1.0)
    p = bf16_rne(tl.math.div_rn(tl.exp(x - mb[:, None]), sb[:, None]))
    if FP8:
        amax = bf16_rne(tl.math.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), sb))
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), E4M3_MAX_C)
        # integer rounding compiled too (no EMU flag here): the same e4m3 bits either way
        tl.store(q_ptr + off, to_e4m3(tl.math.div_rn(p, scale[:, None]), True), mask=ok)
        tl.store(qscale_ptr + rows, scale, mask=rok & (tl.program_id(1) == 0))
    else:
        tl.store(xb_ptr + off, p.to(tl.bfloat16), mask=ok)


@triton.jit
def _soft_kernel(p_ptr, e_ptr, part_ptr, M, SPLIT, V: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, FP8: tl.constexpr, INTERP: tl.constexpr):
    """part[s, rows, cols] = p[rows, slice s] @ E[slice s, cols]. E is [V, H] (bf16) or E^T [H, V] (e4m3,
    K-major for the FP8 MMA). Program ids run row tiles fastest, then output columns, then slices."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    NH: tl.constexpr = H // BLOCK_H
    per = tl.cdiv(tl.cdiv(V, SPLIT), BLOCK_V) * BLOCK_V  # vocabulary per slice (a runtime split: one compile)
    pid_m = pid % num_m
    pid_h = (pid // num_m) % NH
    pid_s = pid // (num_m * NH)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ra = tl.minimum(rows, M - 1)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rv = pid_s * per + tl.arange(0, BLOCK_V)
    p_ptrs = p_ptr + ra[:, None].to(tl.int64) * V + rv[None, :]
    if FP8:
        e_ptrs = e_ptr + hs[None, :].to(tl.int64) * V + rv[:, None]
    else:
        e_ptrs = e_ptr + rv[:, None].to(tl.int64) * H + hs[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    for k in range(0, per, BLOCK_V):
        vok = rv + k < V  # the last slice's tail (predicated loads)
        p = tl.load(p_ptrs, mask=vok[None, :], other=0.0)
        e = tl.load(e_ptrs, mask=vok[:, None], other=0.0)
        if INTERP:  # the interpreter keeps bf16 as raw bits in dot
            p = p.to(tl.float32)
            e = e.to(tl.float32)
        acc = tl.dot(p, e, acc)
        p_ptrs += BLOCK_V
        if FP8:
            e_ptrs += BLOCK_V
        else:
            e_ptrs += BLOCK_V * H
    out = pid_s * M * H + rows[:, None] * H + hs[None, :]
    tl.store(part_ptr + out, acc, mask=(rows < M)[:, None])


@triton.jit
def _finish_kernel(part_ptr, qscale_ptr, e_scale_ptr, done_ptr, out_ptr, M, C, SPLIT, scale, H: tl.constexpr,
                   BLOCK: tl.constexpr, FP8: tl.constexpr):
    """out = bf16(bf16(sum of the slices) * scale) where the row's canvas is not frozen."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * H
    row = offs // H
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(part_ptr + s * M * H + offs, mask=ok, other=0.0)
    if FP8:
        acc = acc * tl.load(qscale_ptr + row, mask=ok, other=0.0) * tl.load(e_scale_ptr + offs % H, mask=ok, other=0.0)
    y = bf16_rne(bf16_rne(acc) * scale).to(tl.bfloat16)
    frozen = tl.load(done_ptr + row // C, mask=ok, other=1) != 0
    tl.store(out_ptr + offs, y, mask=ok & ~frozen)


# -- configs ------------------------------------------------------------------------------------------------------
def _cfg(split: int, stages: int, bk: int = 64, bm: int = 128, warps: int = 8) -> configs.Config:
    return configs.Config(block_m=bm, block_n=128, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)


# split over the vocabulary so that (rows/BLOCK_M) x (2816/128) x split fills the SMs (H100, B = 1: 2 x 22 x 3).
# SM120: 64-row tiles at 4 warps (ptxas holds 8-warp programs to 128 registers there: the 128x128 tile spilled).
_DC = {"soft_embed": 64, "soft_embed_fp8": 128}
for _k, _bk in _DC.items():
    configs.register(_k, {fam: [(256, _cfg(3, 4, _bk)), (512, _cfg(2, 4, _bk)), (2048, _cfg(1, 4, _bk))]
                          for fam in (90, 100)}
                     | {120: [(256, _cfg(2, 3, _bk, 64, 4)), (2048, _cfg(1, 3, _bk, 64, 4))]})
CPU_CONFIG = configs.Config(block_m=16, block_n=32, block_k=64, split_k=2, num_warps=4, num_stages=1)  # interpreter
for _k in _DC:
    configs.TABLES[_k][0] = [(2048, CPU_CONFIG)]


def pick(kernel: str, rows: int, device) -> configs.Config:
    return configs.lookup(kernel, device_cc(device), rows)


@functools.lru_cache(maxsize=None)
def embed_scale(hidden: int) -> float:
    """bf16(sqrt(H)) as model.soft_embed rounds it (53.0 for H = 2816)."""
    return float(torch.tensor(hidden**0.5, dtype=torch.float32).to(torch.bfloat16))


def soft_embed(xb: Tensor, stats: Tensor, weight: Tensor, out: Tensor, done: Tensor, c: int, *,
               weight_scale: Tensor | None = None, probs8: Tensor | None = None, probs8_scale: Tensor | None = None,
               part: Tensor | None = None, cfg: configs.Config | None = None) -> Tensor:
    """out [M, H] bf16 (rows of frozen canvases untouched) from bf16(proc) `xb` [M, V] and pass 2's `stats` [2, M].

    weight: E [V, H] bf16, or E^T [H, V] e4m3 with `weight_scale` [H] (then `probs8` [M, V] e4m3 and `probs8_scale`
    [M] receive the quantised probabilities). bf16: xb is normalised in place. `part` [SPLIT, M, H] fp32 scratch."""
    m, v = xb.shape
    fp8 = weight.dtype == torch.float8_e4m3fn
    h = weight.shape[0] if fp8 else weight.shape[1]
    cfg = cfg or pick("soft_embed_fp8" if fp8 else "soft_embed", m, xb.device)
    assert h % cfg.block_n == 0 and v % 16 == 0 and h % 16 == 0 and out.shape == (m, h) and out.dtype == torch.bfloat16
    if fp8:
        assert weight.shape == (h, v) and weight_scale is not None and probs8 is not None
    else:
        assert weight.shape == (v, h)
    grid = (triton.cdiv(m, PROBS_ROWS), triton.cdiv(v, PROBS_COLS))
    _probs_kernel[grid](xb, stats, probs8 if fp8 else xb, probs8_scale if fp8 else stats, m, V=v,
                        BLOCK_R=PROBS_ROWS, BLOCK_V=PROBS_COLS, FP8=fp8, num_warps=4)
    split = cfg.split_k
    if part is None:
        part = torch.empty(split, m, h, dtype=torch.float32, device=xb.device)
    assert part.shape == (split, m, h)
    nprog = triton.cdiv(m, cfg.block_m) * (h // cfg.block_n) * split
    _soft_kernel[(nprog,)](probs8 if fp8 else xb, weight, part, m, split, V=v, H=h, BLOCK_M=cfg.block_m,
                           BLOCK_H=cfg.block_n, BLOCK_V=cfg.block_k, FP8=fp8, INTERP=interpreting(),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _finish_kernel[(triton.cdiv(m * h, FINISH_BLOCK),)](
        part, probs8_scale if fp8 else part, weight_scale if fp8 else part, done, out, m, c, split, embed_scale(h),
        H=h, BLOCK=FINISH_BLOCK, FP8=fp8, num_warps=4)
    return out


# -- torch reference ----------------------------------------------------------------------------------------------
def soft_embed_ref(proc_bf16: Tensor, weight: Tensor, weight_scale: Tensor | None = None) -> Tensor:
    """bf16 E [V, H]: model.soft_embed's arithmetic. e4m3 E^T [H, V]: runtime.fast's Fp8Linear over the probs."""
    probs = proc_bf16.to(torch.bfloat16).softmax(dim=-1, dtype=torch.float32).to(torch.bfloat16)
    if weight.dtype == torch.float8_e4m3fn:
        h = weight.shape[0]
        q, s = quant_rows_ref(probs)
        y = ((q.float() @ weight.float().t()) * s * weight_scale[None]).to(torch.bfloat16)
    else:
        h = weight.shape[1]
        y = torch.matmul(probs, weight)
    return y * torch.tensor(embed_scale(h), dtype=torch.bfloat16)


# -- AOT ------------------------------------------------------------------------------------------------------------
def aot_specs() -> list[aot.AotSpec]:
    specs = []
    for kernel, fp8 in (("soft_embed", False), ("soft_embed_fp8", True)):
        w = "*fp8e4nv" if fp8 else "*bf16"
        sig = {"p_ptr": w, "e_ptr": w, "part_ptr": "*fp32", "M": "i32", "SPLIT": "i32"} | {
            k: "constexpr" for k in ("V", "H", "BLOCK_M", "BLOCK_H", "BLOCK_V", "FP8", "INTERP")}
        seen = set()  # buckets differ only in the runtime split: one compile per architecture and tile
        for fam, rows, cfg in configs.production(kernel):
            key = (fam, cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
            if key in seen:
                continue
            seen.add(key)
            const = dict(V=V_FULL, H=H_FULL, BLOCK_M=cfg.block_m, BLOCK_H=cfg.block_n, BLOCK_V=cfg.block_k, FP8=fp8,
                         INTERP=False)
            specs.append(aot.AotSpec(f"{kernel}/sm{fam}", _soft_kernel, sig, const, fam, cfg.num_warps,
                                     cfg.num_stages, tensor_cores=True))
        psig = {"xb_ptr": "*bf16", "stats_ptr": "*fp32", "q_ptr": w, "qscale_ptr": "*fp32", "M": "i32",
                "V": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "FP8": "constexpr"}
        fsig = {"part_ptr": "*fp32", "qscale_ptr": "*fp32", "e_scale_ptr": "*fp32", "done_ptr": "*i1",
                "out_ptr": "*bf16", "M": "i32", "C": "i32", "SPLIT": "i32", "scale": "fp32", "H": "constexpr",
                "BLOCK": "constexpr", "FP8": "constexpr"}
        for cc in aot.ARCHS:
            specs.append(aot.AotSpec(f"{kernel}_probs/sm{cc}", _probs_kernel, psig,
                                     dict(V=V_FULL, BLOCK_R=PROBS_ROWS, BLOCK_V=PROBS_COLS, FP8=fp8), cc, 4, 1))
            specs.append(aot.AotSpec(f"{kernel}_finish/sm{cc}", _finish_kernel, fsig,
                                     dict(H=H_FULL, BLOCK=FINISH_BLOCK, FP8=fp8), cc, 4, 1))
    return specs
