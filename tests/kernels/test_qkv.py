"""qkv: one FP8 projection over [q; k; v] with q/k RMSNorm, v_norm, RoPE at per-row positions and K/V written into
the KV buffers, against its torch reference (bit-level) and against model.Attention.qkv with fast.Fp8Linear weights;
sliding (v weight, extended-buffer slots) and full layers (k_eq_v, proportional RoPE, slot = position), TMA-box
and per-row output paths, M/K tails, NaN-poisoned outputs and buffers (nothing but the intended slots written)."""

import types

import pytest
import torch

from dgemma.core.config import ModelConfig
from dgemma.kernels import qkv
from dgemma.kernels.configs import Config
from dgemma.kernels.norm_quant import quant_rows
from dgemma.model.modeling import Attention, DiffusionGemma, rope_inv_freq

from . import aot_pool

from .fp8_weights import exact_rows, fp8_linears

H, NH = 96, 4  # K = 96 over BK = 64: a masked K tail
CFG = ModelConfig(hidden_size=H, num_attention_heads=NH, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                  num_global_key_value_heads=1, num_hidden_layers=2,
                  layer_types=("sliding_attention", "full_attention"),
                  intermediate_size=64, moe_intermediate_size=16, num_experts=4, top_k_experts=2, sliding_window=8)
W1 = CFG.sliding_cache_len  # 7: sliding K/V of canvas token s go to slot 7 + s

KERNEL_MODULE = "dgemma.kernels.qkv"


def _attention(layer, seed=0):
    torch.manual_seed(seed)
    at = fp8_linears(Attention(CFG, layer), ("q_proj", "k_proj", "v_proj"), seed)
    with torch.no_grad():
        for norm in (at.q_norm, at.k_norm):
            norm.weight.copy_(1.0 + 0.2 * torch.randn(norm.weight.shape))
    return at


def _setup(layer, b, s, past, seed=0):
    at = _attention(layer, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = exact_rows(torch.randn(b, s, H, generator=g).to(torch.bfloat16), seed + 2)
    a, a_s = quant_rows(x)
    parts = [(at.q_proj.weight, at.q_proj.scale), (at.k_proj.weight, at.k_proj.scale)]
    if at.v_proj is not None:
        parts.append((at.v_proj.weight, at.v_proj.scale))
    w, ws = qkv.fuse_qkv(*parts)
    past = torch.tensor(past, dtype=torch.int32)
    inv = rope_inv_freq(CFG, at.sliding)
    cos, sin = qkv.rope_tables(past, s, inv)
    return at, x, a, a_s, w, ws, past, inv, cos, sin


def _kw(at, past, s, cos, sin, cap):
    return dict(n_heads=NH, kv_heads=at.kv_heads, head_dim=at.head_dim, q_norm=at.q_norm.weight,
                k_norm=at.k_norm.weight, cos=cos, sin=sin, past=past, seq_len=s,
                slot_base=W1 if at.sliding else None, eps=CFG.rms_norm_eps)


def _caches(b, at, cap):
    return [torch.full((b, at.kv_heads, cap, at.head_dim), float("nan"), dtype=torch.bfloat16) for _ in range(2)]


def _cfg(at, bt=16):
    return Config(block_m=bt, block_n=at.head_dim, block_k=64, num_warps=4, num_stages=2)


def _ulps(a, b):
    a, b = a.float(), b.float()
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=2**-20)))) * 2**-7
    return ((a - b).abs() / spacing).max().item()


CASES = {
    # layer, batch, tokens, past per sequence, cap: sliding = the extended buffer W-1+S; full: a cap that drops the
    # last 3 positions of sequence 1 (slot >= cap is not written)
    "sliding/tma": (0, 2, 16, [5, 30], W1 + 16),
    "sliding/rows": (0, 2, 12, [0, 9], W1 + 12),
    "full/tma": (1, 2, 16, [3, 35], 48),
    "full/rows": (1, 2, 12, [4, 17], 26),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    layer, b, s, past, cap = CASES[case]
    at, x, a, a_s, w, ws, past, inv, cos, sin = _setup(layer, b, s, past)
    kc, vc = _caches(b, at, cap)
    rk, rv = kc.clone(), vc.clone()
    q = torch.full((b, NH, s, at.head_dim), float("nan"), dtype=torch.bfloat16)
    qkv.qkv_project(a, a_s, w, ws, k_cache=kc, v_cache=vc, q_out=q, config=_cfg(at), **_kw(at, past, s, cos, sin, cap))
    rq = qkv.qkv_ref(a, a_s, w, ws, k_cache=rk, v_cache=rv, **_kw(at, past, s, cos, sin, cap))
    assert not q.isnan().any()
    # the written slots, and only those: NaN elsewhere in both
    assert torch.equal(kc.isnan(), rk.isnan()) and torch.equal(vc.isnan(), rv.isnan())
    written = ~rk.isnan()
    per_seq = [s] * b if at.sliding else [min(s, max(0, cap - p)) for p in past.tolist()]
    n_expect = at.kv_heads * at.head_dim * sum(per_seq)
    assert written.sum().item() == n_expect
    # same arithmetic; the projection's fp32 sums run in another order, so a projection may sit one bf16 step
    # away, and RoPE's x*cos - y*sin can cancel: judged on the O(1) scale of normed heads
    for got, ref in ((q, rq), (kc[written], rk[written]), (vc[written], rv[written])):
        d = (got.float() - ref.float()).abs()
        assert d.max().item() <= 2**-6 and (d > 0).float().mean().item() < 0.01


def test_rope_tables_match_model():
    """rope_tables == the first half of model.DiffusionGemma.rope's tables (positions differ per sequence)."""
    past = torch.tensor([0, 1000, 123456], dtype=torch.int32)
    pos = past[:, None].long() + torch.arange(16)[None, :]
    ns = types.SimpleNamespace(inv_freq_sliding=rope_inv_freq(CFG, True), inv_freq_full=rope_inv_freq(CFG, False))
    tables = DiffusionGemma.rope(ns, pos, torch.bfloat16)
    for sliding in (True, False):
        inv = ns.inv_freq_sliding if sliding else ns.inv_freq_full
        cos, sin = qkv.rope_tables(past, 16, inv)
        mc, ms = tables[sliding]
        half = inv.shape[0]
        assert torch.equal(cos, mc.reshape(-1, 2 * half)[:, :half])
        assert torch.equal(sin, ms.reshape(-1, 2 * half)[:, :half])


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_matches_model_attention_qkv(layer):
    """model.Attention.qkv (q_proj/k_proj/v_proj as fast.Fp8Linear, the model's own cos/sin tables) vs the kernel fed
    the same tables. Weights and activations have power-of-two scales (tests/kernels/fp8_weights.py), so the CPU
    Fp8Linear's bf16 dequantisation is exact and both sides compute the same numbers: at most one bf16 step apart
    on a few elements (the projection's fp32 sum order, torch's pow(., -0.5) vs 1/sqrt); measured bit-identical."""
    b, s, past = 2, 16, [6, 41]
    at, x, a, a_s, w, ws, past_t, inv, _, _ = _setup(layer, b, s, past, seed=3)
    pos = past_t[:, None].long() + torch.arange(s)[None, :]
    ns = types.SimpleNamespace(inv_freq_sliding=rope_inv_freq(CFG, True), inv_freq_full=rope_inv_freq(CFG, False))
    cos, sin = DiffusionGemma.rope(ns, pos, torch.bfloat16)[at.sliding]
    with torch.no_grad():
        mq, mk, mv = at.qkv(x, cos, sin)
    cap = W1 + s if at.sliding else 64
    kc, vc = _caches(b, at, cap)
    q = qkv.qkv_project(a, a_s, w, ws, k_cache=kc, v_cache=vc, config=_cfg(at), **_kw(at, past_t, s, cos, sin, cap))
    for bi in range(b):
        slots = (W1 + torch.arange(s)) if at.sliding else pos[bi]
        for got, ref in ((q[bi], mq[bi]), (kc[bi][:, slots], mk[bi]), (vc[bi][:, slots], mv[bi])):
            assert _ulps(got, ref) <= 1.0
            assert (got != ref).float().mean().item() < 0.01


def test_aot_production_configs(aot_rows):
    aot_pool.assert_clean(aot_rows)
    assert all(r["tensor_cores"] for r in aot_rows if r["label"].startswith("qkv_") and r["sm"] == 90)
