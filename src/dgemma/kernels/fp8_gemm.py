"""FP8 GEMM of the dense path: y = (a_e4m3 * sa_row) @ (w_e4m3 * sw_col)^T with its epilogue chosen at compile time.

Owns `gemm` (bf16 out: o_proj, dense down_proj, self-conditioning down_proj), `gemm_gelu` (one pass over a fused
[gate; up] weight: h = gelu_tanh(gate) * up, optionally with the per-row absmax partials that let the next GEMM
quantise h per row), `cat_weights`, `tma_desc` (the TMA operand check every dense kernel uses), torch references,
configs and AOT specs.

Operands are loaded by TMA tensor descriptors (SM90/100/120): out-of-range rows, columns and the K tail are
zero-filled by the hardware, and the descriptors' 16-byte alignment is part of their contract, so the AOT compile
is the pipelined kernel the GPU runs (plain pointers would need the JIT's alignment specialisation, which the AOT
gate's signature cannot express: without it triton emits byte loads and no cp.async pipeline). Row strides must
therefore be multiples of 16 bytes (K % 16 == 0 for e4m3, N % 8 for bf16 outputs).

Activations arrive in one of two forms:
* quantised: e4m3 [M,K] + fp32 scale [M,1] (kernels.norm_quant, residual_norm), as model.lowp.fp8_quantize_rows gives;
* deferred: bf16 [M,K] + fp32 row-absmax partials [M,P] (written by a producer that never sees a whole row, e.g.
  gemm_gelu's N tiles). The prologue takes s = max(partials, 1e-12) / 448 and quantises each A tile as
  e4m3(clamp(a / s)), model.lowp.fp8_quantize_rows's rounding bit for bit (the quotient from the reciprocal and one fma
  correction, numerics.quant_e4m3: the tile is re-quantised by every N-tile program, so no per-element division).

Epilogue roundings follow the model: projections are bf16 tensors (Fp8Linear returns bf16), gelu_mul's gelu and
product are bf16 ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import aot, configs
from .configs import Config
from .numerics import (AMAX_FLOOR, E4M3_MAX, bf16r, device_cc, gelu_tanh, gelu_tanh_ref, interpreting, quant_e4m3,
                       round_bf16, row_scale)

PLAIN, GELU = 0, 1


@triton.jit
def row_scales(a_scale_ptr, a_amax_ptr, rm, M, n_amax, A_DEFERRED: tl.constexpr, NP: tl.constexpr):
    """(dequantisation scale, its reciprocal) per row of the A tile (the reciprocal only matters when deferred)."""
    if A_DEFERRED:
        cols = tl.arange(0, NP)
        parts = tl.load(a_amax_ptr + rm.to(tl.int64)[:, None] * n_amax + cols[None, :],
                        mask=(rm < M)[:, None] & (cols < n_amax)[None, :], other=0.0)
        sa = row_scale(tl.max(parts, axis=1))
    else:
        sa = tl.load(a_scale_ptr + rm, mask=rm < M, other=1.0)
    return sa, tl.div_rn(1.0, sa)


@triton.jit
def mainloop(a_desc, sa, inv_sa, w_desc, n_off, w2_desc, n2_off, pm, K, TWO: tl.constexpr, A_DEFERRED: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EMU: tl.constexpr):
    """fp32 accumulators of A[pm:pm+BM] @ W[n_off:n_off+BN]^T (and of W2[n2_off:...] when TWO), over all of K."""
    acc = tl.zeros((BM, BN), tl.float32)
    acc2 = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = a_desc.load([pm, k])
        if A_DEFERRED:
            a = quant_e4m3(a.to(tl.float32), sa[:, None], inv_sa[:, None], EMU)
        acc = tl.dot(a, w_desc.load([n_off, k]).T, acc)
        if TWO:
            acc2 = tl.dot(a, w2_desc.load([n2_off, k]).T, acc2)
    return acc, acc2


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row, column) offsets of this program's tile: GROUP_M row tiles walk each column of W together, so a W tile is
    read from HBM once and served to the others from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m * BM, pid_n * BN, pid_n


@triton.jit
def _fp8_gemm_kernel(a_desc, a_scale_ptr, a_amax_ptr, w_desc, w2_desc, sw_ptr, sw2_ptr, out_desc, amax_out_ptr,
                     M, N, K, n_amax, n_amax_out,
                     EPI: tl.constexpr, A_DEFERRED: tl.constexpr, OUT_AMAX: tl.constexpr, GROUP_M: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP: tl.constexpr, EMU: tl.constexpr):
    pm, pn, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    rm = pm + tl.arange(0, BM)
    rn = pn + tl.arange(0, BN)
    sa, inv_sa = row_scales(a_scale_ptr, a_amax_ptr, rm, M, n_amax, A_DEFERRED, NP)
    acc, acc2 = mainloop(a_desc, sa, inv_sa, w_desc, pn, w2_desc, pn, pm, K, EPI == 1, A_DEFERRED, BM, BN, BK, EMU)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    y = round_bf16(acc * sa[:, None] * sw[None, :], EMU)
    if EPI == 1:
        u = round_bf16(acc2 * sa[:, None] * tl.load(sw2_ptr + rn, mask=rn < N, other=0.0)[None, :], EMU)
        y = round_bf16(round_bf16(gelu_tanh(y), EMU) * u, EMU)
        if OUT_AMAX:  # columns past N are zero (zero-filled weights): they never raise the max
            tl.store(amax_out_ptr + rm.to(tl.int64) * n_amax_out + pid_n, tl.max(tl.abs(y), axis=1), mask=rm < M)
    out_desc.store([pm, pn], y.to(tl.bfloat16))


# -- configs ----------------------------------------------------------------------------------------------------------
# Untuned defaults by arch family and rows (T = 256 * batch). At 256 rows the GEMMs are bound by the weight read
# (o_proj 11.5 MB, down 5.9 MB e4m3), so 64x64 tiles give >= 132 programs; larger batches get 128-row tiles.
# A deferred (bf16) A tile is quantised in registers: BK 64 keeps it under the register budget.
# SM120 (RTX 5090 / GB10) has 99 KiB of shared memory per block: fewer stages.
PLAIN_KERNEL, DEFERRED_KERNEL, GELU_KERNEL = "fp8_gemm", "fp8_gemm_deferred_a", "fp8_gemm_gelu"
_G = 8
_HOPPER_LIKE = {
    PLAIN_KERNEL: [(256, Config(64, 64, 128, _G, 1, 4, 5)), (4096, Config(128, 128, 128, _G, 1, 8, 4))],
    DEFERRED_KERNEL: [(256, Config(64, 64, 64, _G, 1, 4, 5)), (4096, Config(128, 64, 64, _G, 1, 8, 4))],
    # block_n is the width of each of the two (gate, up) tiles: 2112 = 33 * 64
    GELU_KERNEL: [(256, Config(64, 64, 128, _G, 1, 4, 4)), (4096, Config(128, 64, 128, _G, 1, 8, 4))],
}
_SM120 = {
    PLAIN_KERNEL: [(256, Config(64, 64, 128, _G, 1, 4, 3)), (4096, Config(128, 128, 64, _G, 1, 8, 3))],
    DEFERRED_KERNEL: [(256, Config(64, 64, 64, _G, 1, 4, 3)), (4096, Config(128, 64, 64, _G, 1, 8, 3))],
    GELU_KERNEL: [(256, Config(64, 64, 128, _G, 1, 4, 2)), (4096, Config(128, 64, 64, _G, 1, 8, 3))],
}
for _name in _HOPPER_LIKE:
    configs.register(_name, {90: _HOPPER_LIKE[_name], 100: _HOPPER_LIKE[_name], 120: _SM120[_name]})


def _table(epi: int, deferred: bool) -> str:
    return GELU_KERNEL if epi == GELU else DEFERRED_KERNEL if deferred else PLAIN_KERNEL


# -- launchers --------------------------------------------------------------------------------------------------------
def tma_desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
        raise ValueError(f"TMA operand needs a 16-byte aligned base and row stride: shape {tuple(t.shape)}, "
                         f"strides {t.stride()}, dtype {t.dtype}")
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _a_operand(a, a_scale, a_amax):
    if (a_scale is None) == (a_amax is None):
        raise ValueError("pass exactly one of a_scale (e4m3 activations) and a_amax (deferred bf16 activations)")
    if a_amax is not None:
        assert a.dtype == torch.bfloat16 and a_amax.dtype == torch.float32 and a_amax.shape[0] == a.shape[0]
        return True, a_amax.contiguous()
    assert a.dtype == torch.float8_e4m3fn and a_scale.dtype == torch.float32
    return False, a_scale.reshape(-1).contiguous()


def _launch(epi, a, a_scale, a_amax, w, w2, sw, sw2, n, out, amax_out, config):
    deferred, side = _a_operand(a, a_scale, a_amax)
    m, k = a.shape
    cfg = config or configs.lookup(_table(epi, deferred), device_cc(a.device), m)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    out = out if out is not None else torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    n_tiles = triton.cdiv(n, bn)
    grid = (triton.cdiv(m, bm) * n_tiles,)
    _fp8_gemm_kernel[grid](
        tma_desc(a, [bm, bk]), side, side, tma_desc(w, [bn, bk]), tma_desc(w2, [bn, bk]), sw, sw2,
        tma_desc(out, [bm, bn]),
        amax_out if amax_out is not None else side, m, n, k, side.shape[-1] if deferred else 1,
        amax_out.shape[-1] if amax_out is not None else 1,
        EPI=epi, A_DEFERRED=deferred, OUT_AMAX=amax_out is not None, GROUP_M=cfg.group_m, BM=bm, BN=bn, BK=bk,
        NP=triton.next_power_of_2(side.shape[-1]) if deferred else 1, EMU=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, a_scale: torch.Tensor | None = None,
         a_amax: torch.Tensor | None = None, out: torch.Tensor | None = None, config: Config | None = None):
    """a [M,K] (e4m3 with a_scale [M,1], or bf16 with a_amax [M,P]), w e4m3 [N,K], w_scale fp32 [N] -> bf16 [M,N]."""
    return _launch(PLAIN, a, a_scale, a_amax, w, w, w_scale, w_scale, w.shape[0], out, None, config)


def gemm_gelu(a: torch.Tensor, w_gate_up: torch.Tensor, w_scale: torch.Tensor, *, a_scale=None, a_amax=None,
              amax_out: bool = False, out: torch.Tensor | None = None, config: Config | None = None):
    """h = gelu_tanh(a @ gate^T) * (a @ up^T), w_gate_up = [gate; up] e4m3 [2I,K], w_scale fp32 [2I] -> bf16 [M,I].

    amax_out=True also returns fp32 [M, cdiv(I, block_n)] row-absmax partials of h: pass (h, partials) as
    (a, a_amax) to the next `gemm` and it quantises h per row in its prologue."""
    i = w_gate_up.shape[0] // 2
    m = a.shape[0]
    cfg = config or configs.lookup(GELU_KERNEL, device_cc(a.device), m)
    amax = torch.empty(m, triton.cdiv(i, cfg.block_n), dtype=torch.float32, device=a.device) if amax_out else None
    h = _launch(GELU, a, a_scale, a_amax, w_gate_up[:i], w_gate_up[i:], w_scale[:i], w_scale[i:], i, out, amax, cfg)
    return (h, amax) if amax_out else h


def cat_weights(*linears: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(e4m3 [N_i,K], fp32 [N_i])...] -> one weight: per-output-channel scales make concatenation exact."""
    return (torch.cat([q for q, _ in linears]).contiguous(),
            torch.cat([s.reshape(-1) for _, s in linears]).float().contiguous())


# -- torch references -------------------------------------------------------------------------------------------------
def dequant_a(a, a_scale=None, a_amax=None) -> torch.Tensor:
    """The fp32 A the kernel multiplies: e4m3 * scale, or the deferred prologue's quantisation of bf16 a."""
    if a_amax is not None:
        s = a_amax.amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / E4M3_MAX
        q = (a.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q.float() * s
    return a.float() * a_scale.reshape(-1, 1)


def gemm_ref(a, w, w_scale, a_scale=None, a_amax=None) -> torch.Tensor:
    return bf16r(dequant_a(a, a_scale, a_amax) @ (w.float() * w_scale.reshape(-1, 1)).t()).to(torch.bfloat16)


def gemm_gelu_ref(a, w_gate_up, w_scale, a_scale=None, a_amax=None, block_n: int | None = None):
    """(h bf16, row-absmax partials of h over column blocks of block_n, or None)."""
    i = w_gate_up.shape[0] // 2
    gu = dequant_a(a, a_scale, a_amax) @ (w_gate_up.float() * w_scale.reshape(-1, 1)).t()
    g, u = bf16r(gu[:, :i]), bf16r(gu[:, i:])
    h = bf16r(bf16r(gelu_tanh_ref(g)) * u)
    parts = None
    if block_n:
        pad = torch.zeros(h.shape[0], triton.cdiv(i, block_n) * block_n)
        pad[:, :i] = h.abs()
        parts = pad.view(h.shape[0], -1, block_n).amax(-1)
    return h.to(torch.bfloat16), parts


# -- AOT --------------------------------------------------------------------------------------------------------------
# production shapes: (K, N) of o_proj (sliding 16*256 -> 2816, full 16*512 -> 2816), the dense/self-conditioning
# down_proj (2112 -> 2816) and gate/up (2816 -> 2*2112). The compiled kernel does not depend on them (runtime ints).
def _sig(epi: int, deferred: bool, cfg: Config) -> dict[str, str]:
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    a_ty = "bf16" if deferred else "fp8e4nv"
    sig = {"a_desc": f"tensordesc<{a_ty}[{bm}, {bk}]>", "a_scale_ptr": "*fp32", "a_amax_ptr": "*fp32",
           "w_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>", "w2_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>",
           "sw_ptr": "*fp32", "sw2_ptr": "*fp32", "out_desc": f"tensordesc<bf16[{bm}, {bn}]>", "amax_out_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "n_amax": "i32", "n_amax_out": "i32"}
    sig.update({k: "constexpr" for k in ("EPI", "A_DEFERRED", "OUT_AMAX", "GROUP_M", "BM", "BN", "BK", "NP", "EMU")})
    return sig


# (epilogue, A deferred, writes amax partials, partial count of a deferred A): what the dense path launches
VARIANTS = {
    "plain": (PLAIN, False, False, 1),  # o_proj when the attention kernel hands over e4m3 rows
    "plain/deferred-a": (PLAIN, True, False, 64),  # down_proj after gemm_gelu (33 partials), o_proj from bf16 + amax
    "gelu/amax-out": (GELU, False, True, 1),  # dense and self-conditioning gate/up
}


def aot_specs() -> list[aot.AotSpec]:
    out = []
    for name, (epi, deferred, amax_out, np_) in VARIANTS.items():
        for fam, rows, cfg in configs.production(_table(epi, deferred)):
            const = dict(EPI=epi, A_DEFERRED=deferred, OUT_AMAX=amax_out, GROUP_M=cfg.group_m, BM=cfg.block_m,
                         BN=cfg.block_n, BK=cfg.block_k, NP=np_, EMU=False)
            out.append(aot.AotSpec(f"{name}/rows<={rows}", _fp8_gemm_kernel, _sig(epi, deferred, cfg), const, fam,
                                   cfg.num_warps, cfg.num_stages, tensor_cores=True))
    return out
