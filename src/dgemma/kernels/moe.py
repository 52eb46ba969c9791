"""Fused FP8 routed experts (spec §5.4, docs/kernels.md item 2): routing dispatch on the device, the gate/up GEMM
(GELU(tanh)·up and per-row e4m3 quantisation in its epilogue), the down GEMM (routing weight in its epilogue) and a
deterministic combine. Owns the dispatch/combine kernels and jit helpers that `moe_w4a16` shares, `fp8_moe` (drop-in
for `Fp8Experts.forward`), `fp8_moe_reference` (the same arithmetic in torch), the launch configs and AOT specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import aot, configs
from .configs import Config
from .numerics import E4M3_MAX_C, device_cc, gelu_tanh, gelu_tanh_ref, interpreting, quant_rows_ref, store_cast, to_e4m3

DISPATCH_CHUNK, TILE_CHUNK, QUANT_ROWS, QUANT_BLOCK, COMBINE_ROWS, COMBINE_BLOCK = 1024, 64, 4, 512, 4, 512


def empty(*shape: int, dtype: torch.dtype, device) -> Tensor:
    """Every buffer of the MoE launchers comes from here (the tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# -- jit helpers (shared with moe_w4a16) --------------------------------------------------------------------------
@triton.jit
def _tile_ptrs(base, rows, cols, STRIDE: tl.constexpr):
    """base + rows x STRIDE + cols as a [rows, cols] block of pointers (row alignment: the JIT's specialisation of an
    aligned base with a constexpr stride; the AOT gate compiles the same, aot.AotSpec)."""
    return base + rows[:, None] * STRIDE + cols[None, :]


@triton.jit
def _tile_rows(tile, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, BLOCK_M: tl.constexpr):
    """Expert, sorted rows, row mask and (token, slot) pair of each row of a scheduled tile."""
    e = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(offsets_ptr + e + 1)
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    return e, rows, rmask, pair


@triton.jit
def _acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if BLOCK_M < 64:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    return acc


@triton.jit
def _mma(acc, a, w, BLOCK_M: tl.constexpr):
    """acc += a @ wᵀ, a [BLOCK_M, K] token rows, w [BLOCK_N, K] weight rows. Below 64 tokens the weights take the
    MMA's M side (swap A/B: acc is [BLOCK_N, BLOCK_M]) since the M of wgmma/tcgen05 is at least 64."""
    if BLOCK_M < 64:
        acc = tl.dot(w, tl.trans(a), acc)
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _tokens_major(acc, BLOCK_M: tl.constexpr):
    if BLOCK_M < 64:
        acc = tl.trans(acc)
    return acc


# -- dispatch -----------------------------------------------------------------------------------------------------
@triton.jit
def _dispatch_kernel(idx_ptr, counts_ptr, offsets_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, num_tiles_ptr,
                     x_ptr, xq_ptr, xs_ptr, P, T, E: tl.constexpr, E_POW2: tl.constexpr, H: tl.constexpr,
                     BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, TILES: tl.constexpr, QROWS: tl.constexpr,
                     QBLOCK: tl.constexpr, QUANT_X: tl.constexpr, EMULATE: tl.constexpr):
    """Program e < E: expert e's count, its start in the grouped order, its pairs (ascending = a stable sort), its
    BLOCK_M tiles. Every program histograms all pairs itself, so no grid-wide sync is needed. Programs >= E quantise
    QROWS token rows each to e4m3 (FP8 path). Expert ids must lie in [0, E)."""
    pid = tl.program_id(0)
    if pid < E:
        hist = tl.zeros([E_POW2], tl.int32)
        for c0 in range(0, P, CHUNK):
            r = c0 + tl.arange(0, CHUNK)
            m = r < P
            hist += tl.histogram(tl.load(idx_ptr + r, mask=m, other=0).to(tl.int32), E_POW2, mask=m)
        ex = tl.arange(0, E_POW2)
        tiles = (hist + BLOCK_M - 1) // BLOCK_M
        start = tl.sum(tl.where(ex < pid, hist, 0), 0)
        first_tile = tl.sum(tl.where(ex < pid, tiles, 0), 0)
        count = tl.sum(tl.where(ex == pid, hist, 0), 0)
        tl.store(counts_ptr + pid, count)
        tl.store(offsets_ptr + pid, start)
        if pid == 0:
            tl.store(offsets_ptr + E, tl.sum(hist, 0))
            tl.store(num_tiles_ptr, tl.sum(tiles, 0))
        seen = tl.zeros((), tl.int32)
        for c0 in range(0, P, CHUNK):
            r = c0 + tl.arange(0, CHUNK)
            m = r < P
            sel = (tl.load(idx_ptr + r, mask=m, other=0).to(tl.int32) == pid) & m
            rank = seen + tl.cumsum(sel.to(tl.int32), 0) - 1
            tl.store(order_ptr + start + rank, r, mask=sel)
            seen += tl.sum(sel.to(tl.int32), 0)
        ntiles = (count + BLOCK_M - 1) // BLOCK_M
        for t0 in range(0, ntiles, TILES):
            t = t0 + tl.arange(0, TILES)
            tl.store(tile_expert_ptr + first_tile + t, t * 0 + pid, mask=t < ntiles)
            tl.store(tile_start_ptr + first_tile + t, start + t * BLOCK_M, mask=t < ntiles)
    elif QUANT_X:
        rows = (pid - E) * QROWS + tl.arange(0, QROWS)
        cols = tl.arange(0, QBLOCK)
        amax = tl.zeros([QROWS, QBLOCK], tl.float32)
        for h0 in range(0, H, QBLOCK):
            m = (rows < T)[:, None] & (h0 + cols < H)[None, :]
            v = tl.load(_tile_ptrs(x_ptr + h0, rows, cols, H), mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        s = tl.math.div_rn(tl.maximum(tl.max(amax, 1), 1e-12), E4M3_MAX_C)
        tl.store(xs_ptr + rows, s, mask=rows < T)
        for h0 in range(0, H, QBLOCK):
            m = (rows < T)[:, None] & (h0 + cols < H)[None, :]
            v = tl.load(_tile_ptrs(x_ptr + h0, rows, cols, H), mask=m, other=0.0).to(tl.float32)
            tl.store(_tile_ptrs(xq_ptr + h0, rows, cols, H), to_e4m3(tl.math.div_rn(v, s[:, None]), EMULATE),
                     mask=m)


@dataclass(frozen=True)
class Routing:
    """Device-side routing of the P = T*k (token, slot) pairs; every buffer has its static maximum size (graphs)."""

    counts: Tensor  # int32 [E]: pairs per expert
    offsets: Tensor  # int32 [E+1]: first grouped position of each expert; offsets[E] = P
    order: Tensor  # int32 [P]: grouped position -> pair t*k+j, by expert, in the order a stable sort gives
    tile_expert: Tensor  # int32 [max_tiles]: expert of each BLOCK_M tile (entries >= num_tiles are not written)
    tile_start: Tensor  # int32 [max_tiles]: first grouped position of each tile
    num_tiles: Tensor  # int32 [1]
    block_m: int
    xq: Tensor | None = None  # e4m3 [T, H]: per-token quantised activations (FP8 path)
    xs: Tensor | None = None  # fp32 [T]: their scales


def max_tiles(pairs: int, experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(count_e / block_m) over every routing of `pairs` pairs to `experts` experts."""
    return max(1, min(pairs, (pairs + min(experts, pairs) * (block_m - 1)) // block_m))


def dispatch(idx: Tensor, num_experts: int, block_m: int, x: Tensor | None = None) -> Routing:
    """idx [T,k] expert ids -> Routing (one kernel, no host sync); with x [T,H] it also quantises x per row."""
    t, k = idx.shape
    p, dev = t * k, idx.device
    i32 = dict(dtype=torch.int32, device=dev)
    mt = max_tiles(p, num_experts, block_m)
    r = Routing(empty(num_experts, **i32), empty(num_experts + 1, **i32), empty(p, **i32), empty(mt, **i32),
                empty(mt, **i32), empty(1, **i32), block_m,
                None if x is None else empty(t, x.shape[-1], dtype=torch.float8_e4m3fn, device=dev),
                None if x is None else empty(t, dtype=torch.float32, device=dev))
    h = 16 if x is None else x.shape[-1]
    _dispatch_kernel[(num_experts + (0 if x is None else triton.cdiv(t, QUANT_ROWS)),)](
        idx.contiguous(), r.counts, r.offsets, r.order, r.tile_expert, r.tile_start, r.num_tiles,
        r.order if x is None else x, r.order if x is None else r.xq, r.order if x is None else r.xs, p, t,
        E=num_experts, E_POW2=triton.next_power_of_2(num_experts), H=h, BLOCK_M=block_m, CHUNK=DISPATCH_CHUNK,
        TILES=TILE_CHUNK, QROWS=QUANT_ROWS, QBLOCK=QUANT_BLOCK, QUANT_X=x is not None,
        EMULATE=interpreting(), num_warps=4)
    return r


# -- combine ------------------------------------------------------------------------------------------------------
@triton.jit
def _combine_kernel(y_ptr, out_ptr, T, H: tl.constexpr, TOP_K: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_H: tl.constexpr, EMULATE: tl.constexpr):
    """out[t] = sum over the k slots of the routing-weighted pair rows, in slot order (fp32; deterministic)."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c0 = tl.program_id(1) * BLOCK_H
    cols = tl.arange(0, BLOCK_H)
    m = (t < T)[:, None] & (c0 + cols < H)[None, :]
    y_ptrs = _tile_ptrs(y_ptr + c0, t * TOP_K, cols, H)
    acc = tl.load(y_ptrs, mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(1, TOP_K):
        acc += tl.load(y_ptrs + j * H, mask=m, other=0.0).to(tl.float32)
    store_cast(_tile_ptrs(out_ptr + c0, t, cols, H), acc, m, EMULATE)


def combine(y: Tensor, t: int, k: int, dtype: torch.dtype) -> Tensor:
    """y [T*k, H] weighted pair rows (pair t*k+j) -> [T, H] in `dtype`."""
    h = y.shape[-1]
    out = empty(t, h, dtype=dtype, device=y.device)
    _combine_kernel[(triton.cdiv(t, COMBINE_ROWS), triton.cdiv(h, COMBINE_BLOCK))](
        y, out, t, H=h, TOP_K=k, ROWS=COMBINE_ROWS, BLOCK_H=COMBINE_BLOCK, EMULATE=interpreting(), num_warps=4)
    return out


def pair_dtype(x: Tensor) -> torch.dtype:
    """Pair rows are written in the activation dtype: bf16 halves the combine's traffic; fp32 inputs keep fp32."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"MoE kernels take bf16 or fp32 activations, not {x.dtype}")
    return x.dtype


# -- FP8 GEMMs ----------------------------------------------------------------------------------------------------
@triton.jit
def _fp8_gate_up_kernel(xq_ptr, xs_ptr, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, num_tiles_ptr,
                        w_ptr, ws_ptr, h_ptr, hq_ptr, hs_ptr, H: tl.constexpr, I: tl.constexpr,
                        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EMULATE: tl.constexpr):
    """One tile of one expert's token rows against all 2I gate/up rows of its weights (read once per tile):
    h = GELU(g)·u in fp32 to a scratch row block, then, with the row absmax known, e4m3 h and its per-row scale."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, rmask, pair = _tile_rows(tile, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, BLOCK_M)
    sx = tl.load(xs_ptr + pair // TOP_K, mask=rmask, other=0.0)
    ws_e = ws_ptr + e * (2 * I)
    kk, nn = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
    a_ptrs = _tile_ptrs(xq_ptr, pair // TOP_K, kk, H)  # the tile's token rows, gathered in place
    w_ptrs = _tile_ptrs(w_ptr + e.to(tl.int64) * (2 * I * H), nn, kk, H)
    h_ptrs = _tile_ptrs(h_ptr, rows, nn, I)
    amax = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, I, BLOCK_N):
        nmask = n0 + nn < I
        acc_g = _acc(BLOCK_M, BLOCK_N)
        acc_u = _acc(BLOCK_M, BLOCK_N)
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + kk < H)[None, :]
            a = tl.load(a_ptrs + k0, mask=rmask[:, None] & kmask, other=0.0)
            wg = tl.load(w_ptrs + (n0 * H + k0), mask=nmask[:, None] & kmask, other=0.0)
            wu = tl.load(w_ptrs + ((n0 + I) * H + k0), mask=nmask[:, None] & kmask, other=0.0)
            acc_g = _mma(acc_g, a, wg, BLOCK_M)
            acc_u = _mma(acc_u, a, wu, BLOCK_M)
        g = _tokens_major(acc_g, BLOCK_M) * sx[:, None] * tl.load(ws_e + n0 + nn, mask=nmask, other=0.0)[None, :]
        u = _tokens_major(acc_u, BLOCK_M) * sx[:, None] * tl.load(ws_e + I + n0 + nn, mask=nmask, other=0.0)[None, :]
        h = gelu_tanh(g) * u
        amax = tl.maximum(amax, tl.max(tl.abs(h), 1))
        tl.store(h_ptrs + n0, h, mask=rmask[:, None] & nmask[None, :])
    tl.debug_barrier()  # the second pass reads rows other threads of this program wrote
    hs = tl.math.div_rn(tl.maximum(amax, 1e-12), E4M3_MAX_C)
    tl.store(hs_ptr + rows, hs, mask=rmask)
    hq_ptrs = _tile_ptrs(hq_ptr, rows, nn, I)
    for n0 in range(0, I, BLOCK_N):
        m = rmask[:, None] & (n0 + nn < I)[None, :]
        q = to_e4m3(tl.math.div_rn(tl.load(h_ptrs + n0, mask=m, other=0.0), hs[:, None]), EMULATE)
        tl.store(hq_ptrs + n0, q, mask=m)


@triton.jit
def _fp8_down_kernel(hq_ptr, hs_ptr, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, num_tiles_ptr,
                     w_ptr, ws_ptr, rw_ptr, y_ptr, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """One tile x BLOCK_N output columns: y = (hq @ w8ᵀ) · h_scale · w_scale · routing weight, written to the rows
    of its (token, slot) pairs."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, rmask, pair = _tile_rows(tile, order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < H
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = _tile_ptrs(hq_ptr, rows, kk, I)
    w_ptrs = _tile_ptrs(w_ptr + e.to(tl.int64) * (H * I), rn, kk, I)
    acc = _acc(BLOCK_M, BLOCK_N)
    for k0 in range(0, I, BLOCK_K):
        kmask = (k0 + kk < I)[None, :]
        a = tl.load(a_ptrs + k0, mask=rmask[:, None] & kmask, other=0.0)
        w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask, other=0.0)
        acc = _mma(acc, a, w, BLOCK_M)
    y = _tokens_major(acc, BLOCK_M) * tl.load(hs_ptr + rows, mask=rmask, other=0.0)[:, None]
    y = y * tl.load(ws_ptr + e * H + rn, mask=nmask, other=0.0)[None, :]
    y = y * tl.load(rw_ptr + pair, mask=rmask, other=0.0)[:, None]
    store_cast(_tile_ptrs(y_ptr, pair, rn, H), y, rmask[:, None] & nmask[None, :], EMULATE)


GATE_UP, DOWN = "moe_fp8_gate_up", "moe_fp8_down"


_cfg = configs.tile

# buckets: tokens per expert (T*k/E): 16 at one 256-token canvas, x2 per canvas. block_m < 64 swaps A/B.
# gate/up: one program per tile loops over all I columns (the row absmax needs the whole row).
# SM120 has ~99 KB of shared memory per block: fewer stages and narrower tiles.
configs.register(GATE_UP, {
    90: [(16, _cfg(16, 128, 128, 4, 3)), (32, _cfg(32, 128, 128, 4, 3)), (64, _cfg(64, 64, 128, 4, 4)),
         (128, _cfg(128, 64, 128, 8, 3))],
    100: [(16, _cfg(16, 128, 128, 4, 3)), (32, _cfg(32, 128, 128, 4, 3)), (64, _cfg(64, 64, 128, 4, 4)),
          (128, _cfg(128, 64, 128, 8, 3))],
    120: [(16, _cfg(16, 64, 128, 4, 3)), (32, _cfg(32, 64, 128, 4, 3)), (64, _cfg(64, 64, 64, 4, 3)),
          (128, _cfg(128, 64, 64, 8, 2))],
})
configs.register(DOWN, {
    90: [(16, _cfg(16, 128, 64, 4, 4)), (32, _cfg(32, 128, 64, 4, 4)), (64, _cfg(64, 128, 64, 4, 4)),
         (128, _cfg(128, 128, 64, 8, 3))],
    100: [(16, _cfg(16, 128, 64, 4, 4)), (32, _cfg(32, 128, 64, 4, 4)), (64, _cfg(64, 128, 64, 4, 4)),
          (128, _cfg(128, 128, 64, 8, 3))],
    120: [(16, _cfg(16, 128, 64, 4, 3)), (32, _cfg(32, 128, 64, 4, 3)), (64, _cfg(64, 64, 64, 4, 3)),
          (128, _cfg(128, 64, 64, 8, 2))],
})


def launch_configs(gate_up: str, down: str, device: torch.device, pairs: int, experts: int) -> tuple[Config, Config]:
    """The (gate/up, down) configs for the mean tokens per expert; both share the tile schedule (one block_m)."""
    cc, rows = device_cc(device), triton.cdiv(pairs, experts)
    cg, cd = configs.lookup(gate_up, cc, rows), configs.lookup(down, cc, rows)
    assert cg.block_m == cd.block_m, (gate_up, cc, rows)
    return cg, cd


def fp8_moe(x: Tensor, weights: Tensor, idx: Tensor, w_gate_up: Tensor, s_gate_up: Tensor, w_down: Tensor,
            s_down: Tensor, *, config: tuple[Config, Config] | None = None) -> Tensor:
    """Routed experts with FP8 weights: x [T,H] bf16/fp32, weights fp32 [T,k], idx [T,k]; w_gate_up e4m3 [E,2I,H]
    with fp32 per-row scales [E,2I], w_down e4m3 [E,H,I] with [E,H] (Fp8Experts' buffers) -> [T,H] in x.dtype.
    Four kernels, no host sync, shapes fixed by T (CUDA-graph capturable)."""
    t, k = idx.shape
    e, i2, h = w_gate_up.shape
    i, p, dev = i2 // 2, t * k, x.device
    x = x.reshape(t, h).contiguous()
    ydt = pair_dtype(x)
    cg, cd = config or launch_configs(GATE_UP, DOWN, dev, p, e)
    r = dispatch(idx, e, cg.block_m, x=x)
    hbuf = empty(p, i, dtype=torch.float32, device=dev)
    hq = empty(p, i, dtype=torch.float8_e4m3fn, device=dev)
    hs = empty(p, dtype=torch.float32, device=dev)
    mt = r.tile_expert.numel()
    _fp8_gate_up_kernel[(mt,)](
        r.xq, r.xs, r.order, r.offsets, r.tile_expert, r.tile_start, r.num_tiles, w_gate_up, s_gate_up, hbuf, hq, hs,
        H=h, I=i, TOP_K=k, **cg.constexprs(), EMULATE=interpreting(), num_warps=cg.num_warps,
        num_stages=cg.num_stages)
    y = empty(p, h, dtype=ydt, device=dev)
    _fp8_down_kernel[(mt, triton.cdiv(h, cd.block_n))](
        hq, hs, r.order, r.offsets, r.tile_expert, r.tile_start, r.num_tiles, w_down, s_down,
        weights.reshape(-1).float().contiguous(), y, H=h, I=i, **cd.constexprs(), EMULATE=interpreting(),
        num_warps=cd.num_warps, num_stages=cd.num_stages)
    return combine(y, t, k, x.dtype)


# -- torch reference (the same arithmetic, e4m3 rounding points included) -----------------------------------------
def quant_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> e4m3 [..., K], fp32 scale [...] (Fp8Experts' scale layout): numerics.quant_rows_ref."""
    q, s = quant_rows_ref(x)
    return q, s.squeeze(-1)


def dispatch_reference(idx: Tensor, num_experts: int, block_m: int) -> dict[str, Tensor]:
    """What `dispatch` writes, from a stable sort (tile arrays cut to num_tiles)."""
    flat = idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    tiles = (counts + block_m - 1) // block_m
    te = torch.repeat_interleave(torch.arange(num_experts), tiles)
    first = torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])[:-1]
    ts = offsets[te] + (torch.arange(te.numel()) - first[te]) * block_m
    i32 = torch.int32
    order = torch.sort(flat, stable=True).indices
    return {"counts": counts.to(i32), "offsets": offsets.to(i32), "order": order.to(i32), "tile_expert": te.to(i32),
            "tile_start": ts.to(i32), "num_tiles": torch.tensor([te.numel()], dtype=i32)}


def combine_reference(y: Tensor, dtype: torch.dtype) -> Tensor:
    """y [T, k, H] -> sum over k in slot order, fp32, cast to dtype."""
    acc = y[:, 0].float()
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j].float()
    return acc.to(dtype)


def fp8_moe_reference(x: Tensor, weights: Tensor, idx: Tensor, w_gate_up: Tensor, s_gate_up: Tensor, w_down: Tensor,
                      s_down: Tensor) -> Tensor:
    """`fp8_moe` in torch: e4m3 x per token; fp32 GEMMs of e4m3 values; g,u scaled by x scale then weight scale;
    h = GELU(g)·u in fp32; e4m3 h per (token, slot) row; y = acc·h_scale·w_scale·routing weight, stored in the pair
    dtype; the k slots summed in slot order in fp32."""
    t, k = idx.shape
    e, i2, h = w_gate_up.shape
    i = i2 // 2
    x = x.reshape(t, h)
    xq, xs = quant_rows_reference(x)
    flat, rw = idx.reshape(-1), weights.reshape(-1).float()
    y = torch.zeros(t * k, h, dtype=pair_dtype(x), device=x.device)
    for ex in range(e):
        pairs = (flat == ex).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        tok, sg, sd = pairs // k, s_gate_up[ex].float(), s_down[ex].float()
        acc = xq[tok].float() @ w_gate_up[ex].float().t()
        g = acc[:, :i] * xs[tok][:, None] * sg[None, :i]
        u = acc[:, i:] * xs[tok][:, None] * sg[None, i:]
        hq, hs = quant_rows_reference(gelu_tanh_ref(g) * u)
        yd = (hq.float() @ w_down[ex].float().t()) * hs[:, None] * sd[None, :] * rw[pairs][:, None]
        y[pairs] = yd.to(y.dtype)
    return combine_reference(y.view(t, k, h), x.dtype)


# -- AOT ----------------------------------------------------------------------------------------------------------
FULL = {"H": 2816, "I": 704, "E": 128, "TOP_K": 8}  # diffusiongemma-26B-A4B
_ROUTE = {n: "*i32" for n in ("order_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr", "num_tiles_ptr")}


def signature(fn, types: dict[str, str]) -> dict[str, str]:
    """Triton signature of a kernel: the given pointer/scalar types, constexpr for the rest."""
    return {a: types.get(a, "constexpr") for a in fn.arg_names}


def gemm_specs(kernel: str, fn, types: dict[str, str], consts: dict) -> list[aot.AotSpec]:
    """One spec per distinct (architecture, config) of a GEMM kernel's table, labelled with its buckets."""
    seen: dict[tuple[int, Config], list[int]] = {}
    for fam, rows, cfg in configs.production(kernel):
        seen.setdefault((fam, cfg), []).append(rows)
    return [aot.AotSpec(f"{kernel}/sm{fam}/rows<={','.join(map(str, rows))}/{c.block_m}x{c.block_n}x{c.block_k}",
                        fn, signature(fn, types), dict(consts, **c.constexprs(), EMULATE=False), fam,
                        c.num_warps, c.num_stages, tensor_cores=True)
            for (fam, c), rows in seen.items()]


def aot_specs() -> list[aot.AotSpec]:
    h, i, k = FULL["H"], FULL["I"], FULL["TOP_K"]
    gu = dict(_ROUTE, xq_ptr="*fp8e4nv", xs_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32", h_ptr="*fp32",
              hq_ptr="*fp8e4nv", hs_ptr="*fp32")
    dn = dict(_ROUTE, hq_ptr="*fp8e4nv", hs_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32", rw_ptr="*fp32",
              y_ptr="*bf16")
    disp = dict(idx_ptr="*i64", counts_ptr="*i32", offsets_ptr="*i32", order_ptr="*i32", tile_expert_ptr="*i32",
                tile_start_ptr="*i32", num_tiles_ptr="*i32", x_ptr="*bf16", xq_ptr="*fp8e4nv", xs_ptr="*fp32", P="i32",
                T="i32")
    specs = gemm_specs(GATE_UP, _fp8_gate_up_kernel, gu, {"H": h, "I": i, "TOP_K": k})
    specs += gemm_specs(DOWN, _fp8_down_kernel, dn, {"H": h, "I": i})
    for cc in aot.ARCHS:
        specs.append(aot.AotSpec(f"moe_dispatch/sm{cc}", _dispatch_kernel, signature(_dispatch_kernel, disp),
                                 dict(E=FULL["E"], E_POW2=FULL["E"], H=h, BLOCK_M=16, CHUNK=DISPATCH_CHUNK,
                                      TILES=TILE_CHUNK, QROWS=QUANT_ROWS, QBLOCK=QUANT_BLOCK, QUANT_X=True,
                                      EMULATE=False), cc, 4, 1))
        specs.append(aot.AotSpec(f"moe_combine/sm{cc}", _combine_kernel,
                                 signature(_combine_kernel, {"y_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32"}),
                                 dict(H=h, TOP_K=k, ROWS=COMBINE_ROWS, BLOCK_H=COMBINE_BLOCK,
                                      EMULATE=False), cc, 4, 1))
    return specs
