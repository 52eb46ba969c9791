"""Entropy-bound acceptance, canvas update and adaptive stop of one denoising step on the device (spec §9.2, §9.5).

One Triton program for the whole batch (B <= 8 rows of C = 256 positions: a few microseconds), replacing ~20 tiny
torch ops and the `torch.all(done)` host sync. Per row b, exactly the order of `sampler.generate`:

  h' = h with fixed (template) positions at 0; acc = accept(h', bound)            (sampler.accept_mask)
  nxt = acc ? sample : uniform noise from Philox (stream RENOISE)                  (RNG-3 of the reference)
  nxt, am = template where fixed
  if done[b] (frozen earlier): am = previous argmax, nxt = current canvas
  stable = am equals each of the last K argmax canvases; history shifts by one     (_Stopping)
  mean = mean entropy (over holes with a template); done[b] |= stable & (mean < threshold)
  canvas = nxt, argmax = am, step counter of the row += 1

`done` stays a device tensor: the caller may read it whenever it likes (a host read is then its only sync).

accept(): sort the entropies ascending with the position as tie-break (one int64 sort key: order-preserving bits of
the fp32 entropy, then the index), inclusive cumulative sum, accept rank r iff cumsum_r - h_r <= bound, then a second
sort by position brings the flags back. Equal to `sampler.accept_mask` given the same entropies, except (a) ties
straddling the bound, where torch.sort (not stable) may order tied positions differently (spec §9.2), and (b) a prefix
sum within rounding of the bound: tl.cumsum adds in a tree order, torch.cumsum on the CPU sequentially (on CUDA torch
also scans in parallel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import aot
from .head_sampler import V_FULL
from .philox import INIT, K_INIT, K_RENOISE, RENOISE, philox_ref, uniform_index, uniform_index_ref


@triton.jit
def _accept(h, i, ok, bound, C: tl.constexpr):
    """Entropy-bound acceptance of one row: h [BLOCK_C] fp32, i = arange, ok = i < C -> accepted flags."""
    bits = h.to(tl.int32, bitcast=True)
    okey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # fp32 order as int32 order
    okey = tl.where(ok, okey, 0x7FFFFFFF)  # padding sorts last
    sk = tl.sort((okey.to(tl.int64) << 32) | i.to(tl.int64))
    idx = (sk & 0xFFFFFFFF).to(tl.int32)
    ob = (sk >> 32).to(tl.int32)
    v = tl.where(ob < 0, ob ^ 0x7FFFFFFF, ob).to(tl.float32, bitcast=True)
    v = tl.where(idx < C, v, 0.0)
    cs = tl.cumsum(v, 0)
    sel = (cs - v) <= bound
    back = tl.sort((idx.to(tl.int64) << 32) | sel.to(tl.int64))  # position order again
    return (back & 1) != 0


@triton.jit
def _step_kernel(h_ptr, samp_ptr, am_ptr, canvas_ptr, argmax_ptr, hist_ptr, done_ptr, tmpl_ptr, rng_ptr, acc_ptr,
                 mean_ptr, B, bound, threshold, C: tl.constexpr, V: tl.constexpr, BLOCK_C: tl.constexpr,
                 K: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_TMPL: tl.constexpr):
    i = tl.arange(0, BLOCK_C)
    ok = i < C
    zero = tl.zeros([BLOCK_C], tl.uint32)
    for b in range(B):
        off = b * C + i
        h = tl.load(h_ptr + off, mask=ok, other=0.0)
        samp = tl.load(samp_ptr + off, mask=ok, other=0)
        am = tl.load(am_ptr + off, mask=ok, other=0)
        cur = tl.load(canvas_ptr + off, mask=ok, other=0)
        if HAS_TMPL:
            tmpl = tl.load(tmpl_ptr + off, mask=ok, other=-1)
            fixed = tmpl >= 0
            acc = _accept(tl.where(fixed, 0.0, h), i, ok, bound, C)
            holes = tl.where(ok & ~fixed, 1.0, 0.0)
            mean = tl.math.div_rn(tl.sum(h * holes, 0), tl.maximum(tl.sum(holes, 0), 1.0))
        else:
            acc = _accept(h, i, ok, bound, C)
            mean = tl.math.div_rn(tl.sum(tl.where(ok, h, 0.0), 0), C * 1.0)
        seed = tl.load(rng_ptr + 2 * b)
        ctr = tl.load(rng_ptr + 2 * b + 1)
        r, _, _, _ = tl.philox(seed, zero + i.to(tl.uint32), zero, zero + ctr.to(tl.uint32), zero + K_RENOISE)
        nxt = tl.where(acc, samp, uniform_index(r, V))
        if HAS_TMPL:
            nxt = tl.where(fixed, tmpl, nxt)
            am = tl.where(fixed, tmpl, am)
        if ADAPTIVE:
            frozen = tl.load(done_ptr + b) != 0
            am = tl.where(frozen, tl.load(argmax_ptr + off, mask=ok, other=0), am)
            nxt = tl.where(frozen, cur, nxt)
            same = 0
            for k in tl.static_range(K):
                hk = tl.load(hist_ptr + k * B * C + off, mask=ok, other=0)
                same += tl.sum(tl.where(ok & (hk != am), 1, 0), 0)
                if k > 0:
                    tl.store(hist_ptr + (k - 1) * B * C + off, hk, mask=ok)
            if K > 0:
                tl.store(hist_ptr + (K - 1) * B * C + off, am, mask=ok)
            tl.store(done_ptr + b, frozen | ((same == 0) & (mean < threshold)))
        tl.store(canvas_ptr + off, nxt, mask=ok)
        tl.store(argmax_ptr + off, am, mask=ok)
        tl.store(acc_ptr + off, acc, mask=ok)
        tl.store(mean_ptr + b, mean)
        tl.store(rng_ptr + 2 * b + 1, ctr + 1)


@triton.jit
def _noise_kernel(canvas_ptr, argmax_ptr, tmpl_ptr, rng_ptr, B, C: tl.constexpr, V: tl.constexpr,
                  BLOCK_C: tl.constexpr, HAS_TMPL: tl.constexpr):
    """First canvas of a block: uniform ids from Philox (stream INIT; template ids where fixed); argmax = canvas."""
    i = tl.arange(0, BLOCK_C)
    ok = i < C
    zero = tl.zeros([BLOCK_C], tl.uint32)
    for b in range(B):
        seed = tl.load(rng_ptr + 2 * b)
        ctr = tl.load(rng_ptr + 2 * b + 1)
        r, _, _, _ = tl.philox(seed, zero + i.to(tl.uint32), zero, zero + ctr.to(tl.uint32), zero + K_INIT)
        tok = uniform_index(r, V)
        if HAS_TMPL:
            tmpl = tl.load(tmpl_ptr + b * C + i, mask=ok, other=-1)
            tok = tl.where(tmpl >= 0, tmpl, tok)
        tl.store(canvas_ptr + b * C + i, tok, mask=ok)
        tl.store(argmax_ptr + b * C + i, tok, mask=ok)


def step_update(entropy: Tensor, sample: Tensor, argmax_new: Tensor, canvas: Tensor, argmax: Tensor, hist: Tensor,
                done: Tensor, rng: Tensor, accept: Tensor, mean: Tensor, *, vocab: int, entropy_bound: float,
                confidence_threshold: float, adaptive: bool = True, template: Tensor | None = None) -> None:
    """In place on the device state: canvas/argmax [B, C] int64, hist [K, B, C] int64, done [B] bool, rng [B, 2]
    int64 (counter += 1); writes accept [B, C] bool and mean [B] fp32. entropy/sample/argmax_new: pass 2's [B*C]."""
    b, c = canvas.shape
    k = hist.shape[0]
    assert canvas.dtype == argmax.dtype == hist.dtype == torch.int64 and done.dtype == torch.bool
    _step_kernel[(1,)](entropy, sample, argmax_new, canvas, argmax, hist, done,
                       template if template is not None else canvas, rng, accept, mean, b, float(entropy_bound),
                       float(confidence_threshold), C=c, V=vocab, BLOCK_C=triton.next_power_of_2(c), K=k,
                       ADAPTIVE=adaptive, HAS_TMPL=template is not None, num_warps=4)


def init_canvas(canvas: Tensor, argmax: Tensor, rng: Tensor, *, vocab: int, template: Tensor | None = None) -> None:
    b, c = canvas.shape
    _noise_kernel[(1,)](canvas, argmax, template if template is not None else canvas, rng, b, C=c, V=vocab,
                        BLOCK_C=triton.next_power_of_2(c), HAS_TMPL=template is not None, num_warps=4)


# -- torch reference ----------------------------------------------------------------------------------------------
def accept_ref(h: Tensor, bound: float) -> Tensor:
    """`_accept` in torch: stable sort (position tie-break), inclusive cumsum minus self <= bound."""
    order = torch.sort(h, dim=-1, stable=True).indices
    hs = torch.gather(h, -1, order)
    sel = torch.cumsum(hs, dim=-1) - hs <= bound
    return torch.zeros_like(sel).scatter(-1, order, sel)


def noise_ref(rng: Tensor, c: int, vocab: int, stream: int) -> Tensor:
    """The Philox ids of `_step_kernel` (RENOISE) / `_noise_kernel` (INIT) for rng [B, 2] -> [B, C] int64."""
    r = philox_ref(rng[:, :1].cpu(), torch.arange(c)[None], 0, rng[:, 1:].cpu(), stream)
    return uniform_index_ref(r, vocab).to(rng.device)


def step_update_ref(entropy, sample, argmax_new, canvas, argmax, hist, done, rng, *, vocab, entropy_bound,
                    confidence_threshold, adaptive=True, template=None):
    """`step_update` in torch (returns new tensors: canvas, argmax, hist, done, rng, accept, mean), mirroring the
    order of sampler.generate."""
    b, c = canvas.shape
    h, samp, am = entropy.view(b, c), sample.view(b, c), argmax_new.view(b, c)
    fixed = template >= 0 if template is not None else None
    acc = accept_ref(h if fixed is None else torch.where(fixed, torch.zeros_like(h), h), entropy_bound)
    nxt = torch.where(acc, samp, noise_ref(rng, c, vocab, RENOISE))
    if fixed is not None:
        nxt, am = torch.where(fixed, template, nxt), torch.where(fixed, template, am)
        holes = (~fixed).float()
        mean = (h * holes).sum(-1) / holes.sum(-1).clamp(min=1)
    else:
        mean = h.mean(dim=-1)
    hist, done = hist.clone(), done.clone()
    if adaptive:
        am = torch.where(done[:, None], argmax, am)
        nxt = torch.where(done[:, None], canvas, nxt)
        stable = (hist == am[None]).all(dim=-1).all(dim=0) if hist.shape[0] else torch.ones_like(done)
        if hist.shape[0]:
            hist = torch.roll(hist, shifts=-1, dims=0)
            hist[-1] = am
        done = done | (stable & (mean < confidence_threshold))
    rng = rng.clone()
    rng[:, 1] += 1
    return nxt, am, hist, done, rng, acc, mean


def aot_specs() -> list[aot.AotSpec]:
    sig = {"h_ptr": "*fp32", "samp_ptr": "*i64", "am_ptr": "*i64", "canvas_ptr": "*i64", "argmax_ptr": "*i64",
           "hist_ptr": "*i64", "done_ptr": "*i1", "tmpl_ptr": "*i64", "rng_ptr": "*i64", "acc_ptr": "*i1",
           "mean_ptr": "*fp32", "B": "i32", "bound": "fp32", "threshold": "fp32"} | {
        k: "constexpr" for k in ("C", "V", "BLOCK_C", "K", "ADAPTIVE", "HAS_TMPL")}
    nsig = {"canvas_ptr": "*i64", "argmax_ptr": "*i64", "tmpl_ptr": "*i64", "rng_ptr": "*i64", "B": "i32",
            "C": "constexpr", "V": "constexpr", "BLOCK_C": "constexpr", "HAS_TMPL": "constexpr"}
    specs = []
    for cc in aot.ARCHS:
        specs.append(aot.AotSpec(f"canvas_step/sm{cc}", _step_kernel, sig,
                                 dict(C=256, V=V_FULL, BLOCK_C=256, K=1, ADAPTIVE=True, HAS_TMPL=True), cc, 4, 1))
        specs.append(aot.AotSpec(f"canvas_init/sm{cc}", _noise_kernel, nsig,
                                 dict(C=256, V=V_FULL, BLOCK_C=256, HAS_TMPL=True), cc, 4, 1))
    return specs


__all__ = ["INIT", "RENOISE", "accept_ref", "init_canvas", "noise_ref", "step_update", "step_update_ref"]
