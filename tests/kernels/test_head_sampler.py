"""Fused LM head + sampler kernels (dgemma.kernels.head_sampler, soft_embed, canvas_step, fused_sampler) against
the torch path: model.logits / model.soft_embed on a tiny DiffusionGemma (V = 1008 with a tail tile, H = 64) and
sampler.step_stats / entropy / accept_mask / _Stopping. Under the interpreter on CPU (small shapes); compiled on a GPU.

Token for token: the processed logits and the argmax given the same raw logits, the acceptance mask given the same
entropies, the whole canvas/argmax/done trajectory given the same logits and the same substituted draws. With a
tolerance (measured maxima printed with -s): logits through the GEMM (tanh), entropy, log-probabilities, the soft
embedding. Sampled tokens: in distribution (chi-square), reproducible, equal to the torch twin of the same race.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dgemma.generation import sampler
from dgemma.core.config import TINY, SamplerConfig
from dgemma.kernels import aot, canvas_step, configs, head_sampler as hs, soft_embed as se
from dgemma.kernels.fused_sampler import FusedSampler, HeadWeights
from dgemma.model.modeling import DiffusionGemma

from .conftest import poison

# masked lanes of the interpreted kernels (inf - inf in rows past M) and the interpreter's own numpy deprecation
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:Conversion of an array with ndim:DeprecationWarning")
V, H = 1008, 64  # 1008 = 7 * 128 + 112: a tail vocabulary tile
CFG = configs.Config(block_m=16, block_n=128, block_k=32, num_warps=4, num_stages=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiffusionGemma.random(dataclasses.replace(TINY, vocab_size=V), dtype=torch.bfloat16, seed=0)
    with torch.no_grad():  # a peakier head than the random init: entropies from ~0 to a few nats
        m.embed_tokens.weight.copy_((torch.randn(V, H) * 0.6).to(torch.bfloat16))
        m.norm.weight.copy_(torch.ones(H))
    return m


def _run_head(model, hidden, temp, rng, c, cfg=CFG, weight=None, scale=None):
    """Passes 1 + 2 on poisoned buffers -> (Partials, debug proc)."""
    m = hidden.shape[0] * hidden.shape[1]
    out = hs.Partials.new(m, V, cfg.block_n, "cpu")
    for t in (out.part_f, out.xb, out.argmax, out.sample, out.entropy, out.lp_argmax, out.lp_sample, out.stats):
        poison(t)
    dbg = poison(torch.empty(m, V))
    hn = model.norm(hidden).reshape(m, H)
    w = model.embed_tokens.weight if weight is None else weight
    hs.head_partials(hn, w, temp, rng, c, out, softcap=30.0, weight_scale=scale, cfg=cfg, debug=dbg)
    hs.reduce_partials(out)
    return out, dbg


def _finite(out):
    for t in (out.entropy, out.lp_argmax, out.lp_sample, out.stats):
        assert torch.isfinite(t).all()
    for t in (out.argmax, out.sample):
        assert ((t >= 0) & (t < V)).all()


def test_head_gemm_path_against_model_logits(model):
    """B = 3, C = 16, one temperature per row: argmax, entropy and log-probabilities vs the torch path."""
    b, c = 3, 16
    torch.manual_seed(1)
    hidden = torch.randn(b, c, H).to(torch.bfloat16)
    temp = torch.tensor([0.8, 0.6, 0.408333331])
    rng = torch.tensor([[11, 0], [12, 5], [13, 9]])
    out, dbg = _run_head(model, hidden, temp, rng, c)
    _finite(out)
    raw = model.logits(hidden).reshape(b * c, V)
    t_rows = temp.repeat_interleave(c)[:, None]
    proc, _, am, ent = sampler.step_stats(raw, t_rows)
    # the GEMM sums in another order: its bf16 output may land one bf16 ulp away; otherwise a few fp32 ulps (tanh)
    d = (dbg - proc).abs()
    assert (d <= proc.abs() * 2**-7 + 1e-5).all()
    flips = int((d > 1e-5).sum())
    assert flips < d.numel() // 100
    err_proc = d[d <= 1e-5].max().item()
    assert torch.equal(out.xb, dbg.to(torch.bfloat16))
    # argmax: identical on the kernel's own logits; against torch's logits only a near-tie may differ
    assert torch.equal(out.argmax, torch.argmax(dbg, dim=-1))
    diff = out.argmax != am
    gap = (proc.gather(1, am[:, None]) - proc.gather(1, out.argmax[:, None])).abs()[diff]
    assert (gap <= proc.abs().max() * 2**-7).all()
    # entropy and log-probabilities: tight on the same (kernel) logits, looser through the GEMM's rounding flips
    err_h = (out.entropy - sampler.entropy(dbg)).abs().max().item()
    assert err_h < 2e-5
    err_h_model = (out.entropy - ent).abs().max().item()
    assert err_h_model < 1e-2
    ls = torch.log_softmax(dbg.double(), dim=-1)
    err_lp = max((out.lp_argmax - ls.gather(1, out.argmax[:, None]).squeeze(1)).abs().max().item(),
                 (out.lp_sample - ls.gather(1, out.sample[:, None]).squeeze(1)).abs().max().item())
    assert err_lp < 1e-5
    assert torch.equal(out.sample, hs.sample_ref(dbg, rng, c))
    print(f"\nGEMM path: |proc - torch| {err_proc:.2e} except {flips}/{d.numel()} bf16 output flips (max "
          f"{d.max():.3g}); same logits: |H| {err_h:.2e} nats, |logp| {err_lp:.2e}; vs torch logits: |H| "
          f"{err_h_model:.2e}, argmax diffs {int(diff.sum())}/{b * c}; H range {ent.min():.3g}..{ent.max():.3g}")


def test_same_logits_token_exact_with_ties():
    """From given raw logits: proc bitwise, argmax = torch.argmax (lowest index on exact ties), Categorical entropy."""
    b, c = 2, 8
    torch.manual_seed(2)
    raw = torch.randn(b * c, V) * 4
    raw[0, [3, 700]] = 25.0  # exact tie at the max, in two tiles: the lowest index wins
    raw[1, [130, 131]] = 25.0  # tie inside one tile
    raw[2, 1000:] = 29.0  # the maximum in the tail tile
    raw[3] = -raw[3].abs() * 0.01  # nearly flat: the largest entropy
    temp = torch.tensor([0.8, 0.45])
    rng = torch.tensor([[1, 1], [2, 2]])
    out = hs.Partials.new(b * c, V, 128, "cpu")
    dbg = poison(torch.empty(b * c, V))
    hs.logits_partials(raw, temp, rng, c, out, cfg=CFG, debug=dbg)
    hs.reduce_partials(out)
    _finite(out)
    proc = raw / temp.repeat_interleave(c)[:, None]
    assert torch.equal(dbg, proc)
    assert torch.equal(out.argmax, torch.argmax(proc, dim=-1))
    assert out.argmax[:3].tolist() == [3, 130, 1000]
    ent = torch.distributions.Categorical(logits=proc).entropy()
    err = (out.entropy - ent).abs().max().item()
    assert err < 2e-5 and torch.allclose(out.entropy, sampler.entropy(proc), atol=2e-5, rtol=0)
    ref = hs.stats_ref(proc)  # the kernels' formula (S, W sums) in torch
    assert torch.equal(ref["argmax"], out.argmax) and torch.allclose(ref["entropy"], out.entropy, atol=2e-6, rtol=0)
    print(f"\nsame logits: |H - Categorical.entropy| {err:.2e} (H up to {ent.max():.2f} nats)")


def test_sample_in_distribution_and_reproducible():
    """Tiny vocabulary, 4096 draws (one per position, 2 steps): chi-square against softmax(proc); same seed and
    counter give the same tokens for any tile size; the next counter gives others; equal to the torch twin."""
    v, b, c = 16, 8, 256
    logp = torch.log_softmax(torch.tensor([3.0, 2.5, 2.0, 1.0, 1.0, 0.5, 0, -0.5, -1, -1, -2, -2, -3, -4, -5, -6]), 0)
    temp = torch.tensor(0.5)
    raw = (logp * temp).expand(b * c, v).contiguous()
    rng = torch.stack([torch.arange(b) + 100, torch.zeros(b, dtype=torch.int64)], dim=1)
    cfg = configs.Config(block_m=512, block_n=16)  # big row tiles: the interpreter pays per program
    draws = []
    for step in range(2):
        out = hs.Partials.new(b * c, v, 16, "cpu")
        hs.logits_partials(raw, temp, rng, c, out, cfg=cfg)
        hs.reduce_partials(out)
        assert torch.equal(out.sample, hs.sample_ref(raw / temp, rng, c))
        draws.append(out.sample.clone())
        rng[:, 1] += 1
    assert not torch.equal(draws[0], draws[1])
    counts = torch.bincount(torch.cat(draws), minlength=v).double()
    n = counts.sum()
    p = torch.softmax(raw[0] / temp, 0).double()
    big = n * p >= 5
    tail = n * p[~big].sum()  # cells expecting < 5 draws pooled
    chi2 = (((counts - n * p) ** 2) / (n * p))[big].sum() + (counts[~big].sum() - tail) ** 2 / tail
    dof = int(big.sum())  # cells (big ones + the pooled tail) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10, (chi2, dof, counts, n * p)
    # reproducible and independent of the tile shape (the counter is per vocabulary id, not per tile)
    rng[:, 1] = 0
    out = hs.Partials.new(b * c, v, 128, "cpu")
    hs.logits_partials(raw, temp, rng, c, out, cfg=configs.Config(block_m=256, block_n=128))
    hs.reduce_partials(out)
    assert torch.equal(out.sample, draws[0])
    print(f"\nsampling: chi2 {float(chi2):.1f} with {dof} dof over {int(n)} draws")


def test_soft_embedding_against_model(model):
    """bf16 E: equal to model.soft_embed up to bf16 ties (measured); frozen rows keep their previous embedding."""
    b, c = 2, 16
    torch.manual_seed(3)
    hidden = torch.randn(b, c, H).to(torch.bfloat16)
    out, dbg = _run_head(model, hidden, torch.tensor(0.7), torch.tensor([[5, 0], [6, 0]]), c)
    soft = poison(torch.empty(b * c, H, dtype=torch.bfloat16))
    prev = torch.full((b * c, H), 3.0, dtype=torch.bfloat16)
    soft[c:] = prev[c:]
    done = torch.tensor([False, True])
    se.soft_embed(out.xb, out.stats, model.embed_tokens.weight, soft, done, c, cfg=se.CPU_CONFIG)
    ref = model.soft_embed(dbg.view(b, c, V)).reshape(b * c, H)
    err = (soft[:c].float() - ref[:c].float()).abs().max().item()
    assert err <= 2 ** -7 * ref.float().abs().max().item()  # at most ~a bf16 ulp of the largest entry
    assert torch.equal(soft[c:], prev[c:])
    print(f"\nsoft embedding: max |diff| {err:.3g} (entries up to {ref.abs().max().item():.3g}), "
          f"{int((soft[:c] != ref[:c]).sum())}/{c * H} entries differ")


def test_fp8_head_and_soft_embedding(model):
    """e4m3 E (per-row scales) for the head and E^T (per-channel scales) for the soft GEMM vs the torch twins of
    runtime.fast's Fp8Linear arithmetic (per-token e4m3 activations, fp32 scales, bf16 output)."""
    b, c = 1, 32
    torch.manual_seed(4)
    hidden = torch.randn(b, c, H).to(torch.bfloat16)
    w = HeadWeights.build(model.embed_tokens.weight, fp8_head=True, fp8_soft=True)
    cfg = configs.Config(block_m=16, block_n=128, block_k=64)
    out, dbg = _run_head(model, hidden, torch.tensor(0.6), torch.tensor([[9, 1]]), c, cfg, w.head8, w.head8_scale)
    raw = hs.raw_logits_ref(model.norm(hidden).reshape(c, H), w.head8, 30.0, w.head8_scale)
    assert (dbg - raw / 0.6).abs().max() < 1e-5
    assert torch.equal(out.argmax, torch.argmax(dbg, -1))
    soft = torch.zeros(c, H, dtype=torch.bfloat16)
    p8, s8 = torch.empty(c, V, dtype=torch.float8_e4m3fn), torch.empty(c)
    se.soft_embed(out.xb, out.stats, w.soft8, soft, torch.tensor([False]), c, weight_scale=w.soft8_scale,
                  probs8=p8, probs8_scale=s8, cfg=configs.Config(block_m=16, block_n=32, block_k=64, split_k=3))
    ref = se.soft_embed_ref(dbg.to(torch.bfloat16), w.soft8, w.soft8_scale)
    assert (soft.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    q, s = hs.quant_rows(dbg.to(torch.bfloat16).softmax(-1, dtype=torch.float32).to(torch.bfloat16))
    assert (q.float() != p8.float()).float().mean() < 1e-3 and torch.allclose(s.squeeze(1), s8, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_step_from_hidden(model, fp8):
    """FusedSampler.step on final-normed hidden states (bf16 or e4m3 head and soft weights): the draft, the soft
    embedding and the canvas agree with the torch path on the kernel's own logits."""
    b, c = 2, 16
    torch.manual_seed(7)
    w = HeadWeights.build(model.embed_tokens.weight, fp8_head=fp8, fp8_soft=fp8)
    fs = FusedSampler(w, canvas_length=c, softcap=30.0)
    st = fs.new_state(b, [3, 4])
    fs.begin_canvas(st)
    canvas0, rng0 = st.canvas.clone(), st.rng.clone()
    hidden = model.norm(torch.randn(b, c, H).to(torch.bfloat16))
    dbg = poison(torch.empty(b * c, V))
    out = fs.step(st, hidden, torch.tensor([0.7, 0.5]), debug=dbg)
    proc = dbg.view(b, c, V)
    assert torch.equal(out.argmax, proc.argmax(-1)) and torch.equal(st.argmax, out.argmax)
    acc = sampler.accept_mask(sampler.entropy(proc), 0.1)
    assert torch.equal(st.accept, acc)
    noise = canvas_step.noise_ref(rng0, c, V, canvas_step.RENOISE)
    assert torch.equal(st.canvas, torch.where(acc, out.sample, noise)) and not torch.equal(st.canvas, canvas0)
    ref = model.soft_embed(proc) if not fp8 else se.soft_embed_ref(proc.to(torch.bfloat16), w.soft8, w.soft8_scale)
    assert (st.soft.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


def test_accept_mask_equals_sampler_given_the_same_entropies():
    torch.manual_seed(5)
    b, c = 3, 32
    for scale in (0.002, 0.01, 0.05, 1.0):
        h = torch.rand(b, c) * scale
        h[0, :5] = 0.0  # exact ties (fixed positions) below the bound
        acc = poison(torch.empty(b, c, dtype=torch.bool))
        mean = poison(torch.empty(b))
        st = [torch.zeros(b, c, dtype=torch.int64) for _ in range(2)]
        ids = torch.zeros(b * c, dtype=torch.int64)
        canvas_step.step_update(h.reshape(-1), ids, ids, st[0], st[1], torch.full((1, b, c), -1),
                                torch.zeros(b, dtype=torch.bool), torch.tensor([[1, 0]] * b), acc, mean, vocab=V,
                                entropy_bound=0.1, confidence_threshold=0.005)
        assert torch.equal(acc, sampler.accept_mask(h, 0.1)), scale
        assert torch.allclose(mean, h.mean(-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k,template", [(1, False), (2, True), (0, False)])
def test_fused_loop_against_sampler(model, k, template):
    """Three steps of FusedSampler.step_from_logits against sampler.generate's step logic with the same logits and
    the kernels' own draws substituted for multinomial/randint: canvas, argmax, done, mean entropy, soft."""
    b, c = 2, 8
    scfg = SamplerConfig(stability_threshold=k, max_denoising_steps=4)
    fs = FusedSampler(HeadWeights(model.embed_tokens.weight), canvas_length=c, softcap=30.0,
                      entropy_bound=scfg.entropy_bound, stability_threshold=k,
                      confidence_threshold=scfg.confidence_threshold)
    st = fs.new_state(b, [21, 22])
    tmpl = None
    if template:
        tmpl = torch.full((b, c), -1, dtype=torch.int64)
        tmpl[:, :3] = torch.tensor([5, 6, 7])
    fs.begin_canvas(st, tmpl)
    canvas = canvas_step.noise_ref(st.rng, c, V, canvas_step.INIT)
    if tmpl is not None:
        canvas = torch.where(tmpl >= 0, tmpl, canvas)
    assert torch.equal(st.canvas, canvas)
    argmax, soft = canvas.clone(), torch.zeros(b, c, H, dtype=torch.bfloat16)
    done, stopping = torch.zeros(b, dtype=torch.bool), sampler._Stopping(scfg)
    fixed = tmpl >= 0 if tmpl is not None else None
    holes = (~fixed).float() if fixed is not None else None
    torch.manual_seed(6)
    peaked = torch.randn(c, V)
    peaked[:, 17] = 60.0  # row 0 becomes confident and stable: it stops and freezes
    first_stop = None
    for step, remaining in enumerate(range(4, 1, -1)):
        raw = torch.stack([torch.tanh(peaked / 30) * 30, torch.tanh(torch.randn(c, V) * 3 / 30) * 30])
        t = sampler.temperature(scfg, remaining, "cpu")
        rng0 = st.rng.clone()
        out = fs.step_from_logits(st, raw, t)
        proc, _, am, h = sampler.step_stats(raw, t)
        assert torch.equal(out.argmax, am)
        assert torch.equal(out.sample.reshape(-1), hs.sample_ref(proc.reshape(b * c, V), rng0, c))
        if fixed is not None:
            h = torch.where(fixed, torch.zeros_like(h), h)
        acc = sampler.accept_mask(h, scfg.entropy_bound)
        nxt = torch.where(acc, out.sample, canvas)
        nxt = torch.where(~acc, canvas_step.noise_ref(rng0, c, V, canvas_step.RENOISE), nxt)
        if fixed is not None:
            nxt, am = torch.where(fixed, tmpl, nxt), torch.where(fixed, tmpl, am)
        next_soft = model.soft_embed(proc)
        if done.any():
            am = torch.where(done[:, None], argmax, am)
            nxt = torch.where(done[:, None], canvas, nxt)
            next_soft = torch.where(done[:, None, None], soft, next_soft)
        stop, mean_h = stopping(am, proc, holes)
        done = done | stop
        canvas, argmax, soft = nxt, am, next_soft
        assert torch.equal(st.accept, acc) and torch.equal(st.canvas, canvas) and torch.equal(st.argmax, argmax)
        assert torch.equal(st.done, done), (step, st.done, done)
        assert torch.allclose(st.mean, mean_h, rtol=1e-5, atol=1e-7)
        assert (st.soft.float() - soft.float()).abs().max() <= 2 ** -7 * soft.float().abs().max()
        if first_stop is None and bool(done[0]):
            first_stop = step
    assert first_stop == k and not bool(done[1])  # stable needs K earlier identical argmax canvases
    assert torch.equal(st.rng[:, 1], torch.full((b,), 3))


@pytest.mark.slow  # ~90 s here with a warm triton cache (36 compiles + ptxas), minutes cold
def test_production_configs_compile_for_sm90_sm100_sm120():
    """AOT gate: every production config of the three kernel modules, within shared memory, no spills, the
    architecture's MMA instruction in the GEMMs (wgmma on SM90, tcgen05.mma on SM100, mma.sync on SM120)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:  # one child process per module
        rows = [r for rs in pool.map(aot.gate, [f"dgemma.kernels.{m}" for m in ("head_sampler", "soft_embed",
                                                                                "canvas_step")]) for r in rs]
    print("\n" + aot.table(rows))
    assert [r for r in rows if r["problems"]] == []
    assert {r["sm"] for r in rows} == set(aot.ARCHS)
    gemms = [r for r in rows if r["label"].startswith(("head_partials", "soft_embed/", "soft_embed_fp8/"))]
    assert len(gemms) == 12 and all(r["tensor_cores"] for r in gemms)
    assert all(r["kernel"] in ("_head_kernel", "_soft_kernel") for r in gemms)
