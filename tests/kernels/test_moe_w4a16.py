"""W4A16 MoE kernels (dgemma.kernels.moe_w4a16): the in-kernel NVFP4 dequantization against qdq_ops.nvfp4_dq bit for
bit (every e2m1 code, zero / subnormal / max e4m3 block scales, per-expert global scales), the fused launcher against
its torch reference (tight) and against the model's grouped experts on the dequantized weights, and the AOT gate of
every production config. Launcher buffers start poisoned (NaN / -7)."""

from __future__ import annotations

import pytest
import torch

from dgemma.kernels import aot, configs, moe_w4a16 as w4
from dgemma.kernels.configs import Config

from .moe_cases import E, H, KINDS, TOKENS, max_abs, model_experts, rel_l2, randn, routing

I4 = 48  # NVFP4 needs K % 16 == 0: 48 = 32 + a masked 16-column tail at BLOCK_K 32, and at BLOCK_N 32
CONFIGS = {"swap": (Config(16, 32, 64), Config(16, 64, 32)), "plain": (Config(64, 32, 64), Config(64, 64, 32))}
# kernel vs w4a16_moe_reference: the same bf16 operands and rounding points; only the fp32 summation order differs,
# which can move h across a bf16 rounding boundary (one 2^-8 step of one h element): |diff| <= 1e-4 max|ref| for
# fp32 out (measured 2.7e-7), one bf16 step for bf16 out (measured: identical)
TIGHT_FP32, TIGHT_BF16 = 1e-4, 2.0 ** -7
# vs model.Experts._grouped in fp32 on the same bf16-valued x and weights: the kernel rounds h to bf16 (2^-9
# relative per element) for the bf16 down GEMM, the model path does not: measured rel-L2 1.8e-3
MODEL_REL_L2 = 1e-2

# e4m3 block-scale codes: +-0, every subnormal (0x01-0x07: 2^-9..7*2^-9), the smallest normal 2^-6, 1.0, 1.75, 448
# (0x7E, the largest), 416, 2.25, 0.28125
SCALE_EDGES = [0x00, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x38, 0x3E, 0x7E, 0x7D, 0x41, 0x29]
GLOBAL_EDGES = [1.0, 2.0 ** -10, 1.0 / (6 * 448), 3.7e-3, 448.0]  # per expert


def nvfp4_weights(e: int, n: int, k: int, seed: int):
    """Random codes, positive block scales around 1-8, global scales ~1e-2: weights of magnitude ~0.1."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g)
    scale = (1 + 7 * torch.rand(e, n, k // 16, generator=g)).to(torch.float8_e4m3fn)
    return packed, scale, 0.01 + 0.02 * torch.rand(e, generator=g)


def moe_weights(seed: int):
    return (*nvfp4_weights(E, 2 * I4, H, seed), *nvfp4_weights(E, H, I4, seed + 1))


def edge_weights():
    """Row r: every block scaled by SCALE_EDGES[r]; its 256 bytes are all byte values (all 16 x 16 code pairs)."""
    n, k = len(SCALE_EDGES), 512
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(GLOBAL_EDGES), n, 1)
    scale = torch.tensor(SCALE_EDGES, dtype=torch.uint8)[None, :, None].expand(len(GLOBAL_EDGES), n, k // 16)
    return packed, scale.contiguous().view(torch.float8_e4m3fn), torch.tensor(GLOBAL_EDGES)


@pytest.mark.parametrize("case", ["edges", "tails"])
def test_dequantization_equals_nvfp4_dq_bit_for_bit(case):
    from dgemma.model.lowp import nvfp4_decode as nvfp4_dq

    if case == "edges":
        (packed, scale, s2), tiles = edge_weights(), dict(block_n=16, block_k=128)
    else:  # 40 x 96 at 32 x 64 tiles: masked tails in both directions
        (packed, scale, s2), tiles = nvfp4_weights(3, 40, 96, seed=3), dict(block_n=32, block_k=64)
    got = w4.nvfp4_dequant(packed, scale, s2, **tiles)
    want = nvfp4_dq(packed, scale, s2, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bits: -0.0 and NaN patterns included
    assert torch.equal(w4.nvfp4_dequant_reference(packed, scale, s2).view(torch.int16), want.view(torch.int16))
    if case == "edges":  # the edges really are there: all 16 codes x every scale edge x every global scale
        assert (want.view(torch.int16) == -32768).any() and (want == 0).any() and (want.abs().max() == 6 * 448 * 448)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", TOKENS)
def test_w4a16_moe_matches_its_reference(poisoned, t, kind, cfg):
    w, idx = routing(t, kind, seed=200 + t)
    x = randn(t, H, seed=t)
    wts = moe_weights(seed=t)
    out = w4.w4a16_moe(x, w, idx, *wts, config=CONFIGS[cfg])
    ref = w4.w4a16_moe_reference(x, w, idx, *wts)
    assert out.shape == (t, H) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert max_abs(out, ref) <= TIGHT_FP32 * ref.abs().max()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_w4a16_moe_bf16_activations(poisoned, cfg):
    w, idx = routing(33, "hot", seed=11)
    x = randn(33, H, seed=11).to(torch.bfloat16)
    wts = moe_weights(seed=11)
    out = w4.w4a16_moe(x, w, idx, *wts, config=CONFIGS[cfg])
    ref = w4.w4a16_moe_reference(x, w, idx, *wts)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TIGHT_BF16, atol=TIGHT_BF16 * ref.float().abs().max())


def test_w4a16_moe_near_the_model_path(poisoned):
    """model.Experts._grouped in fp32 on nvfp4_dq's weights and the same (bf16-valued) x; production tiles."""
    from dgemma.model.lowp import nvfp4_decode as nvfp4_dq

    w, idx = routing(33, "random", seed=13)
    x = randn(33, H, seed=13).to(torch.bfloat16).float()
    gp, gs, g2, dp, ds, d2 = wts = moe_weights(seed=13)
    ex = model_experts(nvfp4_dq(gp, gs, g2, torch.bfloat16).float(), nvfp4_dq(dp, ds, d2, torch.bfloat16).float())
    with torch.no_grad():
        ref = ex._grouped(x, w, idx)
    out = w4.w4a16_moe(x, w, idx, *wts)
    assert rel_l2(out, ref) < MODEL_REL_L2


def test_configs_share_the_schedule_and_swap_small_tiles():
    for fam in (90, 100, 120):
        gu, dn = configs.TABLES[w4.GATE_UP][fam], configs.TABLES[w4.DOWN][fam]
        assert [r for r, _ in gu] == [r for r, _ in dn]
        assert all(a.block_m == b.block_m for (_, a), (_, b) in zip(gu, dn))
        assert configs.lookup(w4.GATE_UP, fam, 16).block_m < 64


@pytest.fixture(scope="module")
def aot_rows():
    return aot.gate("dgemma.kernels.moe_w4a16")


def test_every_production_config_compiles_clean(aot_rows):
    for r in aot_rows:
        assert r["problems"] == [] and r["spills"] == 0 and r["smem"] <= aot.SMEM_LIMIT[r["sm"]], r
        assert r["tensor_cores"], r  # wgmma on SM90, tcgen05 on SM100, mma on SM120
    for kernel in (w4.GATE_UP, w4.DOWN):
        for fam, rows, c in configs.production(kernel):
            hits = [r for r in aot_rows if r["label"].startswith(f"{kernel}/sm{fam}/")
                    and str(rows) in r["label"].split("/")[2][len("rows<="):].split(",")
                    and r["label"].endswith(f"/{c.block_m}x{c.block_n}x{c.block_k}")]
            assert len(hits) == 1 and (hits[0]["warps"], hits[0]["stages"]) == (c.num_warps, c.num_stages), \
                (kernel, fam, rows)
    assert {r["sm"] for r in aot_rows} == set(aot.ARCHS)
