"""fp8_gemm: plain and GELU(tanh)*up epilogues, e4m3 and deferred (bf16 + row-absmax partials) activations, against the
torch references and against model.MLP / model.SelfConditioning with fast.Fp8Linear weights; masked M/N/K tails,
NaN-poisoned outputs, AOT gate (wgmma on SM90)."""

import pytest
import torch

from dgemma.kernels import fp8_gemm as fg
from dgemma.kernels.configs import Config
from dgemma.kernels.norm_quant import norm_quant, quant_rows
from dgemma.kernels.numerics import markstein_div_ref
from dgemma.model.modeling import MLP, SelfConditioning
from dgemma.model.lowp import fp8_quantize_rows as _quant_rows_eager
from dgemma.runtime.fast import Fp8Linear

from . import aot_pool
from .conftest import poison
from .fp8_weights import exact_rows, fp8_linears

# 32-row tiles over M = 48 (a half tile left), 32-column tiles over N = 48 / I = 40, K = 96 over BK = 64
SMALL = Config(block_m=32, block_n=32, block_k=64, group_m=2, num_warps=4, num_stages=2)
M, K, N, I = 48, 96, 48, 40

KERNEL_MODULE = "dgemma.kernels.fp8_gemm"


def _w(n, k, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    lin = Fp8Linear(torch.randn(n, k, generator=g) * scale * torch.linspace(0.5, 2.0, n)[:, None])
    return lin


def _x(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.linspace(0.2, 3.0, m)[:, None]).to(torch.bfloat16)


def _ulps(a, b):
    """Largest |a-b| in units of b's bf16 spacing (1 = one rounding step)."""
    a, b = a.float(), b.float()
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=1e-30)))) * 2**-7
    return ((a - b).abs() / spacing).max().item()


def test_plain_matches_reference_with_tails():
    lin = _w(N, K, 1)
    q, s = quant_rows(_x(M, K, 2))
    out = poison(torch.empty(M, N, dtype=torch.bfloat16))
    y = fg.gemm(q, lin.weight, lin.scale, a_scale=s, out=out, config=SMALL)
    ref = fg.gemm_ref(q, lin.weight, lin.scale, a_scale=s)
    assert not y.isnan().any()
    # same products, different fp32 summation order: at most one bf16 rounding step apart
    assert _ulps(y, ref) <= 1.0


def test_gelu_matches_reference_and_partials():
    gate, up = _w(I, K, 3), _w(I, K, 4)
    wgu, sgu = fg.cat_weights((gate.weight, gate.scale), (up.weight, up.scale))
    q, s = quant_rows(_x(M, K, 5))
    out = poison(torch.empty(M, I, dtype=torch.bfloat16))
    h, parts = fg.gemm_gelu(q, wgu, sgu, a_scale=s, amax_out=True, out=out, config=SMALL)
    rh, rparts = fg.gemm_gelu_ref(q, wgu, sgu, a_scale=s, block_n=SMALL.block_n)
    assert not h.isnan().any() and parts.shape == (M, 2)
    assert _ulps(h, rh) <= 1.0
    # the partials are maxima of the kernel's own h: exactly the row absmax of each 32-column block of h
    hp = torch.zeros(M, 64)
    hp[:, :I] = h.float().abs()
    assert torch.equal(parts, hp.view(M, 2, 32).amax(-1))
    assert torch.allclose(parts, rparts, rtol=2**-7, atol=0)


def test_deferred_a_matches_quantised_a():
    """bf16 A + partials == fast._quant_rows_eager(A) then the e4m3 GEMM: the same e4m3 codes, so the same bits."""
    lin = _w(N, 48, 6)  # K = 48: one masked 64-wide K block
    h = _x(M, 48, 7)
    parts = torch.stack([h[:, :24].float().abs().amax(-1), h[:, 24:].float().abs().amax(-1)], -1)
    y = fg.gemm(h, lin.weight, lin.scale, a_amax=parts, config=SMALL)
    assert _ulps(y, fg.gemm_ref(h, lin.weight, lin.scale, a_amax=parts)) <= 1.0
    q, s = _quant_rows_eager(h)
    ye = fg.gemm(q, lin.weight, lin.scale, a_scale=s, config=SMALL)
    assert torch.equal(y, ye)


def test_prologue_division_sequence():
    """The compiled prologue's x * (1/s) + one fma correction is torch's x / s for bf16 activations and row scales
    (about 25% of plain x * (1/s) quotients differ in the last bit, and bf16 / (amax/448) often lands exactly on
    an e4m3 midpoint, where that bit decides the code)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    x = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float())).bfloat16().float()
    amax = (x.abs() * (1 + 7 * torch.rand(n, generator=g))).bfloat16().float()
    x[::7] = amax[::7] * 0.75  # exact e4m3 midpoints after scaling: 336 = (320 + 352) / 2
    s = amax.clamp(min=1e-12) / 448.0
    assert torch.equal(markstein_div_ref(x, s), x / s)
    assert not torch.equal(x * (1.0 / s), x / s)


def _mlp(h, i, seed):
    return fp8_linears(MLP(h, i), ("gate_proj", "up_proj", "down_proj"), seed)


def _kernel_mlp(mlp, q, s, cfg=SMALL):
    wgu, sgu = fg.cat_weights((mlp.gate_proj.weight, mlp.gate_proj.scale), (mlp.up_proj.weight, mlp.up_proj.scale))
    h, parts = fg.gemm_gelu(q, wgu, sgu, a_scale=s, amax_out=True, config=cfg)
    return fg.gemm(h, mlp.down_proj.weight, mlp.down_proj.scale, a_amax=parts, config=cfg)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_dense_mlp_matches_model():
    """model.MLP with fast.Fp8Linear layers (CPU fallback: activations fake-quantised per row and rounded back to
    bf16, weights dequantised to bf16, bf16 matmul). Weights and the input rows have power-of-two scales
    (fp8_weights.py), so gate/up are the same numbers on both sides; h's row scale is not a power of two, so the
    fallback rounds q_h * s_h to bf16 (2^-9) where the kernel keeps q_h and s_h apart: relative L2 < 0.5%."""
    mlp = _mlp(96, 80, 8)
    x = exact_rows(_x(M, 96, 9), 9)
    q, s = quant_rows(x)
    y = _kernel_mlp(mlp, q, s)
    with torch.no_grad():
        ref = mlp(x)
    assert _rel(y, ref) < 5e-3, _rel(y, ref)  # measured 0.11%


def test_self_conditioning_mlp_matches_model():
    """SelfConditioning: pre_norm + quantisation (norm_quant), gate/up + GELU (gemm_gelu), down (deferred gemm);
    the residual add and no-scale post_norm in torch here (kernels.residual_norm owns the layer ones). pre_norm's
    output has no power-of-two row scale, so the CPU fallback's bf16 rounding of the dequantised activations moves
    the gate/up sums by ~2^-10 and, through h's quantisation, about 1 in 30 e4m3 codes of h by one step (6%):
    relative L2 < 3%."""
    from dgemma.model.modeling import Ops

    from dgemma.core.config import ModelConfig

    cfg = ModelConfig(hidden_size=96, intermediate_size=80, num_hidden_layers=1, layer_types=("full_attention",))
    torch.manual_seed(10)
    sc = SelfConditioning(cfg)
    with torch.no_grad():
        sc.pre_norm.weight.add_(0.1 * torch.randn(96))
    sc = fp8_linears(sc, ("gate_proj", "up_proj", "down_proj"), 10)
    emb, soft = _x(M, 96, 11), _x(M, 96, 12)
    q, s = norm_quant(soft, sc.pre_norm.weight, cfg.rms_norm_eps)
    y = _kernel_mlp(sc, q, s)
    out = Ops.rms_norm(emb + y, None, cfg.rms_norm_eps)
    with torch.no_grad():
        ref = sc(emb, soft)
    assert _rel(out, ref) < 3e-2, _rel(out, ref)  # measured 1.6%


def test_rejects_unaligned_rows():
    q = torch.zeros(8, 40, dtype=torch.float8_e4m3fn)  # 40-byte rows: not a TMA stride
    with pytest.raises(ValueError, match="16-byte"):
        fg.gemm(q, torch.zeros(16, 40, dtype=torch.float8_e4m3fn), torch.ones(16), a_scale=torch.ones(8, 1),
                config=SMALL)


def test_aot_production_configs(aot_rows):
    aot_pool.assert_clean(aot_rows)
    for r in aot_rows:
        assert r["tensor_cores"], r  # wgmma in every SM90 PTX, the architecture's MMA elsewhere
