"""residual_norm: post_attention (residual + post-attention norm, pre-FFN norms quantised, router with top-k) and
post_ffn (three FFN norms, residual, layer scalar, next layer's input norm quantised) against their torch references
and against model.Layer / model.Router / model.Layer.ffn; row and H-chunk tails, NaN-poisoned outputs, top-k ties."""

import types

import pytest
import torch

from dgemma.core.config import ModelConfig
from dgemma.kernels import residual_norm as rn
from dgemma.kernels.configs import Config
from dgemma.model.modeling import Layer
from dgemma.model.lowp import fp8_quantize_rows as _quant_rows_eager

from . import aot_pool
from .conftest import poison

H, E, TOP_K, T = 96, 8, 3, 40
CFG = ModelConfig(vocab_size=64, hidden_size=H, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  num_global_key_value_heads=1, num_experts=E, top_k_experts=TOP_K,
                  layer_types=("sliding_attention", "full_attention"), sliding_window=8)
# 16-row blocks over T = 40 (a half block left), 64-column chunks over H = 96 (a half chunk left)
PA_CFG = Config(block_m=16, block_k=64, num_warps=4, num_stages=1)
PF_CFG = Config(block_m=2, num_warps=4, num_stages=1)

KERNEL_MODULE = "dgemma.kernels.residual_norm"


@pytest.fixture(scope="module")
def model():
    return build_layers()


def build_layers():
    """Two bf16 model.Layer's initialised as DiffusionGemma.random does (built directly: random() goes through the
    meta device, whose first use costs seconds of torch imports)."""
    g = torch.Generator().manual_seed(0)
    layers = []
    with torch.no_grad():
        for i in range(2):
            layer = Layer(CFG, i).requires_grad_(False)
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight") or name.endswith("router.scale"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif name.endswith("per_expert_scale"):
                    p.copy_(1.0 + 0.1 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
            layer.router.proj.weight.mul_(25.0)  # logits O(1): routing decided by more than bf16 rounding
            layer.layer_scalar.fill_(0.875)
            layers.append(layer.to(torch.bfloat16))
    return types.SimpleNamespace(layers=layers)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(rn, "_empty", lambda *a, **k: poison(torch.empty(*a, **k)))


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) * 2).to(torch.bfloat16)
    attn = (torch.randn(T, H, generator=g) * 0.3).to(torch.bfloat16)
    return x, attn


def _pa_args(layer):
    return (layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
            layer.pre_feedforward_layernorm_2.weight, layer.router.scale, layer.router.proj.weight,
            layer.router.per_expert_scale, TOP_K, CFG.rms_norm_eps)


def _codes_equal_frac(a, b):
    """Fraction of e4m3 codes that differ; fails if any differs by more than one e4m3 step."""
    a, b = a.float(), b.float()
    assert ((a - b).abs() <= torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=2**-6))) - 3)).all()
    return (a != b).float().mean().item()


def _ulp_frac(a, b):
    """Fraction of bf16 elements that differ; fails if any differs by more than one bf16 step."""
    a, b = a.float(), b.float()
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=1e-30)))) * 2**-7
    assert ((a - b).abs() <= spacing).all()
    return (a != b).float().mean().item()


def test_post_attention_matches_reference(model, poisoned):
    layer = model.layers[0]
    x, attn = _inputs(1)
    out = rn.post_attention(x, attn, *_pa_args(layer), ff_bf16=True, ff2_bf16=True, config=PA_CFG)
    r, (q1, s1, n1), (q2, s2, n2), w, idx = rn.post_attention_ref(x, attn, *_pa_args(layer))
    for got in (out.r, out.ff[0], out.ff[1], out.ff2[0], out.ff2[1], out.ff_bf16, out.ff2_bf16, out.weights):
        assert not got.float().isnan().any()
    assert (out.experts >= 0).all()
    # same arithmetic; the sums of squares run in another order (chunked), which can move the last bit of a
    # reciprocal root and with it a bf16 value by one step: measured 2 of 3840 elements of one norm
    for got, ref in ((out.r, r), (out.ff_bf16, n1), (out.ff2_bf16, n2)):
        assert _ulp_frac(got, ref) < 2e-3
    assert torch.allclose(out.ff[1], s1, rtol=2**-8, atol=0) and torch.allclose(out.ff2[1], s2, rtol=2**-8, atol=0)
    assert _codes_equal_frac(out.ff[0], q1) < 2e-3 and _codes_equal_frac(out.ff2[0], q2) < 2e-3
    assert torch.equal(out.experts, idx)
    assert torch.allclose(out.weights, w, rtol=1e-6, atol=1e-7)


def test_post_attention_matches_model(model):
    """model: r = x + post_attention_layernorm(attn); Router(r); fast._quant_rows_eager(pre_feedforward_layernorm(r));
    pre_feedforward_layernorm_2(r). Differences: torch's pow(., -0.5) vs the kernel's 1/sqrt (last fp32 bit of the
    reciprocal root -> at most one bf16 step on a few elements), and torch.topk's unspecified order of equal
    probabilities (none here: logits are spread). Routing weights to 1e-5 relative (fp32 softmax, exp and sums in
    another order)."""
    layer = model.layers[1]
    x, attn = _inputs(2)
    out = rn.post_attention(x, attn, *_pa_args(layer), ff_bf16=False, ff2_bf16=True, config=PA_CFG)
    with torch.no_grad():
        r = x + layer.post_attention_layernorm(attn)
        w, idx = layer.router(r)
        q1, s1 = _quant_rows_eager(layer.pre_feedforward_layernorm(r))
        n2 = layer.pre_feedforward_layernorm_2(r)
    assert _ulp_frac(out.r, r) < 0.01 and _ulp_frac(out.ff2_bf16, n2) < 0.01
    assert torch.allclose(out.ff[1], s1, rtol=2**-8, atol=0)
    assert _codes_equal_frac(out.ff[0], q1) < 0.01
    assert torch.equal(out.experts.long(), idx)
    assert torch.allclose(out.weights, w, rtol=1e-5, atol=1e-7)


def test_topk_ties_take_the_lowest_expert_first(model):
    """Experts 1, 4 and 6 share one router row, so their probabilities are equal in every row: the kernel lists them
    in ascending order, and where the tie straddles the k-th place it keeps the lowest ids (torch.topk's order of
    ties is unspecified; away from such rows it selects the same set with the same weights)."""
    layer = model.layers[0]
    x, attn = _inputs(3)
    args = list(_pa_args(layer))
    proj = args[4].clone()
    proj[4] = proj[1]
    proj[6] = proj[1]
    args[4] = proj
    out = rn.post_attention(x, attn, *args, config=PA_CFG)
    _, _, _, w, idx = rn.post_attention_ref(x, attn, *args)
    assert torch.equal(out.experts, idx) and torch.allclose(out.weights, w, rtol=1e-6, atol=1e-7)
    straddles = 0
    with torch.no_grad():
        tw, ti = layer.router.__class__.forward(types.SimpleNamespace(
            scale=layer.router.scale, proj=types.SimpleNamespace(weight=proj), per_expert_scale=args[5],
            root=H ** -0.5, top_k=TOP_K, norm=types.SimpleNamespace(eps=CFG.rms_norm_eps)), out.r)
    for row, trow, wrow, twrow in zip(out.experts.tolist(), ti.tolist(), out.weights, tw):
        present = [e for e in row if e in (1, 4, 6)]
        assert present == sorted(present)
        if 0 < len(present) < 3:
            straddles += 1
            assert present == [1, 4, 6][: len(present)]
        else:  # no tie across the k-th place: torch.topk picks the same experts with the same weights
            assert sorted(row) == sorted(trow)
            order = [trow.index(e) for e in row]
            assert torch.allclose(wrow, twrow[order], rtol=1e-5)
    assert straddles > 0


def test_post_ffn_matches_reference(model, poisoned):
    l0, l1 = model.layers
    g = torch.Generator().manual_seed(4)
    r, h1, h2 = ((torch.randn(T, H, generator=g) * sc).to(torch.bfloat16) for sc in (2.0, 0.5, 0.1))
    args = (l0.post_feedforward_layernorm_1.weight, l0.post_feedforward_layernorm_2.weight,
            l0.post_feedforward_layernorm.weight, l0.layer_scalar.to(torch.bfloat16), CFG.rms_norm_eps)
    out, (q, s), y = rn.post_ffn(r, h1, h2, *args, next_norm=l1.input_layernorm.weight, next_bf16=True,
                                 config=PF_CFG)
    ro, (rq, rs, ry) = rn.post_ffn_ref(r, h1, h2, *args, next_norm=l1.input_layernorm.weight)
    assert not out.isnan().any() and not y.isnan().any() and not s.isnan().any()
    # four chained norms, each sum of squares in another order: one bf16 step on a few elements
    assert _ulp_frac(out, ro) < 2e-3 and _ulp_frac(y, ry) < 2e-3
    assert torch.allclose(s, rs, rtol=2**-8, atol=0) and _codes_equal_frac(q, rq) < 2e-3
    plain = rn.post_ffn(r, h1, None, *args, config=PF_CFG)  # no MoE output: post_ffn_norm(post_ffn_norm_1(h1))
    assert _ulp_frac(plain, rn.post_ffn_ref(r, h1, None, *args)[0]) < 2e-3


def test_post_ffn_matches_model_layer_ffn(model):
    """model.Layer.ffn(r, scalar) against post_ffn fed the model's own raw dense-MLP and expert outputs, and the next
    layer's input_layernorm + fast._quant_rows_eager: the same ops, so equal up to the 1/sqrt-vs-pow last bit (at
    most one bf16 step on a few elements)."""
    l0, l1 = model.layers
    g = torch.Generator().manual_seed(5)
    r = (torch.randn(2, T // 2, H, generator=g) * 2).to(torch.bfloat16)
    scalar = l0.layer_scalar.to(torch.bfloat16)
    with torch.no_grad():
        ref = l0.ffn(r, scalar).reshape(-1, H)
        flat = r.reshape(-1, H)
        h1 = l0.mlp(l0.pre_feedforward_layernorm(r))
        w, idx = l0.router(flat)
        h2 = l0.experts(l0.pre_feedforward_layernorm_2(flat), w, idx)
        rq, rs = _quant_rows_eager(l1.input_layernorm(ref))
    out, (q, s) = rn.post_ffn(r, h1, h2, l0.post_feedforward_layernorm_1.weight, l0.post_feedforward_layernorm_2.weight,
                              l0.post_feedforward_layernorm.weight, scalar, CFG.rms_norm_eps,
                              next_norm=l1.input_layernorm.weight, config=PF_CFG)
    assert _ulp_frac(out, ref) < 0.01
    assert torch.allclose(s, rs, rtol=2**-7, atol=0) and _codes_equal_frac(q, rq) < 0.01


def test_aot_production_configs(aot_rows):
    aot_pool.assert_clean(aot_rows)
