"""`dgemma probe` in its reduced CPU form (tiny shapes, the kernels under the Triton interpreter): every phase runs and
records its figures, the kernel table checks each kernel against its reference, JSON and CSV are written, and a
budget too small for a phase skips it with the reason instead of overrunning."""

import csv
import json

import pytest

from dgemma.cli import main

pytest.importorskip("triton")

PHASES = ("environment", "ceilings", "kernels", "model", "step", "breakdown", "commit", "prefill", "anchor", "batch4",
          "inflight", "w4a16")


def test_probe_cpu_tiny_runs_every_phase(tmp_path, capsys):
    assert main(["probe", "--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "probe.json").read_text())
    assert tuple(res["phases"]) == PHASES
    ph = res["phases"]
    assert all(p["status"] == "ok" for p in ph.values()), {k: p.get("error") for k, p in ph.items()}
    kt = res["phases"]["kernels"]["table"]
    assert {r["category"] for r in kt} == {"moe", "dense_gemm", "attention", "head", "other"}
    assert all(r["ok"] and r["error"] <= r["tol"] and r["ms"] > 0 for r in kt)
    m = {k: v.get("metrics", {}) for k, v in res["phases"].items()}
    assert m["ceilings"]["copy_bandwidth"] > 0
    bd = res["phases"]["breakdown"]["table"]
    assert set(bd) == {"off", "on"} and all(bd["on"][c] > 0 for c in ("moe", "dense_gemm", "attention", "other"))
    assert m["step"]["top1_on_vs_off"] > 0.8 and m["step"]["step_ms_p50_on"] > 0
    assert m["anchor"]["tok_s_reference_sampler"] > 0 and m["anchor"]["tok_s_fused_sampler"] > 0
    assert res["phases"]["anchor"]["fused_sampler"]["tokens"] == 32  # one 32-token canvas
    assert res["phases"]["batch4"]["fused_sampler"]["tokens"] == 2 * 32
    assert m["inflight"]["step_ms_p50_rows2"] > 0 and m["inflight"]["throughput_rows1_vs_rows1"] == 1
    assert m["inflight"]["row0_rel_l2_rows2_vs_alone"] < 1e-2  # bf16, dense experts on the CPU
    assert m["w4a16"]["weights_GB"] == pytest.approx(m["w4a16"]["weights_GB_arithmetic"])
    rows = list(csv.reader((tmp_path / "probe.csv").open()))
    assert rows[0] == ["phase", "metric", "value", "unit"] and any(r[:2] == ["anchor", "tok_s_fused_sampler"]
                                                                  for r in rows)
    out = capsys.readouterr().out
    assert "category (ms/step)" in out and "fp8_moe" in out and "anchor.tok_s_fused_sampler" in out


def test_probe_skips_what_the_budget_cannot_hold(tmp_path):
    assert main(["probe", "--device", "cpu", "--tiny", "--budget-s", "5", "--json", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    ph = res["phases"]
    assert ph["environment"]["status"] == "ok" and ph["ceilings"]["status"] == "ok"
    assert ph["kernels"]["status"] == "skipped" and "would overrun the budget" in ph["kernels"]["reason"]
    assert ph["step"]["status"] == "skipped" and ph["step"]["reason"] == "needs phase model"
    assert res["elapsed_s"] < 5 and (tmp_path / "p.csv").exists()
