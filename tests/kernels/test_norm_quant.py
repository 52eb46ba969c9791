"""norm_quant: RMSNorm + per-row e4m3 quantisation against its torch reference (bit-level) and against the model's
own path fast._quant_rows_eager(Ops.rms_norm(x, w, eps)); masked tails, NaN-poisoned outputs, AOT gate."""

import pytest
import torch

from dgemma.kernels import norm_quant as nq
from dgemma.kernels.configs import Config
from dgemma.kernels.numerics import bf16r
from dgemma.model.modeling import Ops
from dgemma.model.lowp import fp8_quantize_rows as _quant_rows_eager

from . import aot_pool
from .conftest import poison

EPS = 1e-6
SMALL = Config(block_m=2, num_warps=4, num_stages=1)  # 2 rows per program: T odd leaves a masked row

KERNEL_MODULE = "dgemma.kernels.norm_quant"


def _inputs(t=37, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, k, generator=g) * torch.linspace(0.1, 4.0, t)[:, None]).to(torch.bfloat16)
    w = (1.0 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16)
    return x, w


def _codes_differ(a, b):
    """Fraction of e4m3 codes that differ, and the largest difference in e4m3 steps (|a-b| / spacing at a)."""
    af, bf = a.float(), b.float()
    diff = af != bf
    step = torch.exp2(torch.floor(torch.log2(af.abs().clamp(min=2**-6)))) / 8
    return diff.float().mean().item(), ((af - bf).abs() / step).max().item()


@pytest.mark.parametrize("with_weight", [True, False])
def test_matches_reference(with_weight):
    x, w = _inputs()
    w = w if with_weight else None
    q = torch.empty(37, 96, dtype=torch.float8_e4m3fn).fill_(float("nan"))
    s = poison(torch.empty(37, 1))
    y = poison(torch.empty(37, 96, dtype=torch.bfloat16))
    nq.norm_quant(x, w, EPS, want_bf16=True, out=(q, s, y), config=SMALL)
    rq, rs, ry = nq.norm_quant_ref(x, w, EPS)
    # same arithmetic; only the order of the sum of squares differs -> bit-identical on these inputs
    assert not q.float().isnan().any() and not y.isnan().any() and not s.isnan().any()
    assert torch.equal(y.float(), ry.float())
    assert torch.allclose(s, rs, rtol=1e-6, atol=0)
    frac, steps = _codes_differ(q, rq)
    assert frac == 0.0, (frac, steps)


def test_matches_model_path():
    """fast._quant_rows_eager(Ops.rms_norm(x, w, eps)): torch's CPU pow(., -0.5) differs from the kernel's
    correctly rounded 1/sqrt in the last fp32 bit, which can move a bf16 normed value by one ulp and with it an e4m3
    code by one step on a few elements; the scales agree to 1 bf16 ulp."""
    x, w = _inputs(t=64, k=160, seed=1)
    q, s, y = nq.norm_quant(x, w, EPS, want_bf16=True, config=SMALL)
    ym = Ops.rms_norm(x, w, EPS)
    qm, sm = _quant_rows_eager(ym)
    dy = ((y.float() - ym.float()).abs() / ym.float().abs().clamp(min=1e-3)).max().item()
    assert dy <= 2**-8, dy
    assert torch.allclose(s, sm, rtol=2**-8, atol=0)
    frac, steps = _codes_differ(q, qm)
    assert frac < 0.01 and steps <= 1.0, (frac, steps)
    deq = (q.float() * s - qm.float() * sm).abs().max().item()
    assert deq <= 2**-4 * ym.float().abs().max().item()


def test_quant_rows_is_exact():
    """No norm: the same division as fast._quant_rows_eager, so the same bits."""
    x, _ = _inputs(t=21, k=80, seed=2)
    x[3] = 0.0  # an all-zero row takes the 1e-12 floor
    x[5, 7] = 1e4  # a row with one huge value: the rest underflow into e4m3 subnormals
    q, s = nq.quant_rows(x, config=SMALL)
    qm, sm = _quant_rows_eager(x)
    assert torch.equal(s, sm)
    assert torch.equal(q.float(), qm.float())


def test_bf16_only_output():
    x, w = _inputs(t=9, k=48, seed=3)
    y = nq.norm_quant(x, w, EPS, quant=False, config=Config(block_m=1, num_warps=2, num_stages=1))
    assert torch.equal(y.float(), bf16r(nq.norm_quant_ref(x, w, EPS)[2]))


def test_aot_production_configs(aot_rows):
    aot_pool.assert_clean(aot_rows)
