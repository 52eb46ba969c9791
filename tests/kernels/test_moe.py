"""FP8 MoE kernels (dgemma.kernels.moe): device dispatch against a stable sort, in-kernel e4m3 rounding against torch,
the fused launcher against its torch reference (tight), against the model's grouped experts on the dequantized
weights and against Fp8Experts (loose: activation quantisation), and the AOT gate of every production config.

Under the interpreter every launcher buffer starts poisoned (NaN / 0x7F / -7), so an element a kernel should have
written and did not fails the comparison."""

from __future__ import annotations

import pytest
import torch

from dgemma.kernels import aot, configs, moe
from dgemma.kernels.configs import Config

from .moe_cases import E, EMPTY_EXPERT, H, HOT_EXPERT, I, KINDS, TOKENS, max_abs, model_experts, randn, rel_l2, \
    routing

# test tiles: swap A/B (16 tokens on the MMA's N side) and plain; every loop ends in a masked tail at H=96, I=40
CONFIGS = {"swap": (Config(16, 32, 64), Config(16, 64, 32)), "plain": (Config(64, 32, 64), Config(64, 64, 32))}
# kernel vs fp8_moe_reference: the same arithmetic and rounding points; only the fp32 summation order of the GEMMs
# differs (numpy vs torch matmul): |diff| <= 1e-5 max|ref| for fp32 out (measured 1.4e-7), one bf16 step for bf16
# out (measured: identical)
TIGHT_FP32, TIGHT_BF16 = 1e-5, 2.0 ** -7
# vs the model's grouped experts on the dequantized weights: the kernel also rounds x and h to e4m3 per row (3
# mantissa bits: <= 2^-4 relative per element, ~2.6% rms per quantized tensor) and the model path does not:
# measured rel-L2 3.4e-2
MODEL_REL_L2 = 6e-2
# vs Fp8Experts (CPU path: fake-quantized x and h, dequantized weights): the same rounding points with another fp32
# association and F.gelu; the bound leaves room for an isolated e4m3 tie flip of h (measured 3.6e-7)
FP8_EXPERTS_REL_L2 = 1e-3


def fp8_weights(seed: int, e: int = E, h: int = H, i: int = I):
    """Per-row e4m3 weights and fp32 scales as Fp8Experts stores them, plus the fp32 originals."""
    wgu = randn(e, 2 * i, h, seed=seed, scale=h ** -0.5)
    wd = randn(e, h, i, seed=seed + 1, scale=i ** -0.5)
    (qg, sg), (qd, sd) = moe.quant_rows_reference(wgu), moe.quant_rows_reference(wd)
    return (qg, sg, qd, sd), (wgu, wd)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", TOKENS)
def test_dispatch_groups_pairs_like_a_stable_sort(poisoned, t, kind, block_m):
    from dgemma.model.lowp import fp8_quantize_rows as _quant_rows_eager

    _, idx = routing(t, kind, seed=t)
    x = randn(t, H, seed=t, scale=3.0).to(torch.bfloat16 if block_m == 64 else torch.float32)
    r = moe.dispatch(idx if block_m == 16 else idx.int(), E, block_m, x=x)  # top-k's int64 ids, or int32
    ref = moe.dispatch_reference(idx, E, block_m)
    n = r.num_tiles.item()
    assert n == ref["num_tiles"].item() <= r.tile_expert.numel() == moe.max_tiles(t * 2, E, block_m)
    for name in ("counts", "offsets", "order"):
        assert torch.equal(getattr(r, name), ref[name]), name
    assert torch.equal(r.tile_expert[:n], ref["tile_expert"]) and torch.equal(r.tile_start[:n], ref["tile_start"])
    assert r.counts[EMPTY_EXPERT] == 0 and (kind == "random" or r.counts[HOT_EXPERT] == t)
    q, s = _quant_rows_eager(x)  # the fast path's per-token e4m3 scaling, bit for bit
    assert torch.equal(r.xq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(r.xs, s.squeeze(-1))


def test_activation_quantisation_rounds_like_torch(poisoned):
    """Every e4m3 value, every midpoint between neighbours (ties to even, subnormals included), +-0 and +-448:
    with a row absmax of 448 the scale is 1 and the kernel's e4m3 must equal torch's cast bit for bit."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[vals.isfinite()].unique()
    ties = (vals[1:] + vals[:-1]) / 2
    row = torch.cat([vals, ties, torch.tensor([-0.0, 0.0, 2.0 ** -10, -(2.0 ** -10), 3 * 2.0 ** -10])])
    row = torch.cat([row, randn(600 - row.numel(), seed=1)])
    x = torch.stack([row, row.flip(0), randn(600, seed=2, scale=900.0)])  # last row: scale != 1, clamp at 448
    r = moe.dispatch(torch.zeros(3, 1, dtype=torch.long), 1, 16, x=x)
    q, s = moe.quant_rows_reference(x)
    assert torch.equal(r.xs[:2], torch.ones(2)) and torch.equal(r.xs, s)
    assert torch.equal(r.xq.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(r.xq[0].view(torch.uint8), row.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", TOKENS)
def test_fp8_moe_matches_its_reference(poisoned, t, kind, cfg):
    w, idx = routing(t, kind, seed=100 + t)
    x = randn(t, H, seed=t)
    wts, _ = fp8_weights(seed=t)
    out = moe.fp8_moe(x, w, idx, *wts, config=CONFIGS[cfg])
    ref = moe.fp8_moe_reference(x, w, idx, *wts)
    assert out.shape == (t, H) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert max_abs(out, ref) <= TIGHT_FP32 * ref.abs().max()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fp8_moe_bf16_activations(poisoned, cfg):
    w, idx = routing(33, "hot", seed=5)
    x = randn(33, H, seed=5).to(torch.bfloat16)
    wts, _ = fp8_weights(seed=5)
    out = moe.fp8_moe(x, w, idx, *wts, config=CONFIGS[cfg])
    ref = moe.fp8_moe_reference(x, w, idx, *wts)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TIGHT_BF16, atol=TIGHT_BF16 * ref.float().abs().max())


def test_fp8_moe_near_the_model_path(poisoned):
    """model.Experts._grouped (fp32, no activation quantisation) on the dequantized e4m3 weights; production tiles."""
    w, idx = routing(33, "random", seed=7)
    x = randn(33, H, seed=7)
    (qg, sg, qd, sd), _ = fp8_weights(seed=7)
    ex = model_experts(qg.float() * sg[..., None], qd.float() * sd[..., None])
    with torch.no_grad():
        ref = ex._grouped(x, w, idx)
    out = moe.fp8_moe(x, w, idx, qg, sg, qd, sd)
    assert rel_l2(out, ref) < MODEL_REL_L2


def test_fp8_moe_replaces_fp8_experts(poisoned):
    """Fp8Experts.forward's CPU path (fake-quantized activations) with its own buffers: the drop-in interface."""
    from dgemma.runtime.fast import Fp8Experts

    w, idx = routing(33, "hot", seed=9)
    x = randn(33, H, seed=9)
    _, (wgu, wd) = fp8_weights(seed=9)
    f8 = Fp8Experts(model_experts(wgu, wd))
    with torch.no_grad():
        ref = f8(x, w, idx)
    out = moe.fp8_moe(x, w, idx, f8.gate_up_proj, f8.gate_up_proj_scale, f8.down_proj, f8.down_proj_scale)
    assert rel_l2(out, ref) < FP8_EXPERTS_REL_L2


def test_configs_share_the_schedule_and_swap_small_tiles():
    for fam in (90, 100, 120):
        gu, dn = configs.TABLES[moe.GATE_UP][fam], configs.TABLES[moe.DOWN][fam]
        assert [r for r, _ in gu] == [r for r, _ in dn]
        assert all(a.block_m == b.block_m for (_, a), (_, b) in zip(gu, dn))
        # ~16 tokens per expert (one canvas): a token tile below the MMA's minimum M of 64 -> weights on M
        assert configs.lookup(moe.GATE_UP, fam, 16).block_m < 64 and configs.lookup(moe.DOWN, fam, 16).block_m < 64
    assert moe.launch_configs(moe.GATE_UP, moe.DOWN, torch.device("cpu"), 256 * 8, 128)[0].block_m == 16


@pytest.fixture(scope="module")
def aot_rows():
    return aot.gate("dgemma.kernels.moe")


def test_every_production_config_compiles_clean(aot_rows):
    for r in aot_rows:
        assert r["problems"] == [] and r["spills"] == 0 and r["smem"] <= aot.SMEM_LIMIT[r["sm"]], r
    for kernel in (moe.GATE_UP, moe.DOWN):
        for fam, rows, c in configs.production(kernel):
            hits = [r for r in aot_rows if r["label"].startswith(f"{kernel}/sm{fam}/")
                    and str(rows) in r["label"].split("/")[2][len("rows<="):].split(",")
                    and r["label"].endswith(f"/{c.block_m}x{c.block_n}x{c.block_k}")]
            assert len(hits) == 1 and (hits[0]["warps"], hits[0]["stages"]) == (c.num_warps, c.num_stages), \
                (kernel, fam, rows)
            assert hits[0]["tensor_cores"], hits[0]  # wgmma on SM90, tcgen05.mma on SM100, mma.sync on SM120
    assert {r["sm"] for r in aot_rows} == set(aot.ARCHS)
    assert any(r["label"].startswith("moe_dispatch/") for r in aot_rows)
