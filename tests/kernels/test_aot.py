"""The AOT gate itself: a tensor-core kernel compiles for SM90/100/120 with its architecture's MMA instruction,
registers and spills are read from ptxas, and a spilling config is reported as unfit; config lookup by bucket."""

import triton
import triton.language as tl

from dgemma.kernels import aot, configs


@triton.jit
def _mm(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        acc += tl.dot(tl.load(a + rm[:, None] * K + (k + rk)[None, :]), tl.load(b + (k + rk)[:, None] * BN + rn[None, :]))
    tl.store(c + rm[:, None] * BN + rn[None, :], acc)


SIG = {"a": "*fp8e4nv", "b": "*fp8e4nv", "c": "*fp32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
       "BK": "constexpr"}


def aot_specs():
    small = [aot.AotSpec(f"mm64/sm{cc}", _mm, SIG, {"BM": 64, "BN": 64, "BK": 64}, cc, 4, 2, tensor_cores=True)
             for cc in aot.ARCHS]
    # a 256x128 fp32 accumulator over 8 warps: 128 values a thread before the operands (152 B spilled, with the
    # aligned pointers aot.spec_attrs states; the unaligned form spilled already at 128x128x128)
    return small + [aot.AotSpec("mm256x128/sm120", _mm, SIG, {"BM": 256, "BN": 128, "BK": 64}, 120, 8, 3)]


def test_gate_reads_tensor_cores_registers_and_spills():
    rows = aot.gate(__name__)
    small, big = rows[:3], rows[3]
    for r in small:
        assert r["problems"] == [] and r["tensor_cores"], r
        assert 0 < r["regs"] <= 255 and r["smem"] > 0
    assert {r["sm"] for r in small} == {90, 100, 120}
    assert big["spills"] > 0 and any("spill" in p for p in big["problems"])
    assert "| mm64/sm90 | 90 |" in aot.table(rows)


def test_lookup_picks_bucket_and_family():
    configs.register("_test", {90: [(16, configs.Config(block_m=16)), (256, configs.Config(block_m=64))],
                               100: [(256, configs.Config(block_m=128))], 120: [(256, configs.Config(block_m=32))]})
    assert configs.lookup("_test", 90, 10).block_m == 16
    assert configs.lookup("_test", 90, 100).block_m == 64
    assert configs.lookup("_test", 90, 10_000).block_m == 64  # the last bucket serves anything larger
    assert configs.lookup("_test", 121, 1).block_m == 32
    assert configs.lookup("_test", 100, 1).block_m == 128
