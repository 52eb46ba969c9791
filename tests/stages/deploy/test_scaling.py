"""docs/scaling.md's arithmetic: the measured constants match the committed bench results, the tables in the doc are
the ones dgemma.deploy.scaling generates, and the planning functions do what the doc says."""

from __future__ import annotations

import json
import math

import pytest

from dgemma.deploy import scaling
from dgemma.deploy.spec import make_spec

from .conftest import ROOT

RESULTS = ROOT / "bench" / "results" / "h100" / "fp8"


def _result(scenario: str) -> dict:
    return json.loads(next(RESULTS.glob(f"20261123T085634Z-60f640b-{scenario}-fast.json")).read_text())


def test_constants_are_the_committed_measurements():
    anchor = _result("anchor")
    run = anchor["runs"][1]  # the run bench/reports/h100-fp8.md reports (439.5 tok/s); run 0 is a cold start
    assert run["batch"] == 1 and run["committed_tokens"] == scaling.OUT_TOKENS and anchor["scenario"]["steps"] == 16
    assert round(run["e2e_s"], 3) == scaling.H100_ANCHOR_E2E_S and round(run["generation_tok_s"], 1) == 439.5
    conc = _result("concurrency")
    assert conc["scenario"]["max_new_tokens"] == 512 and conc["scenario"]["prompt_tokens"] == 1024
    for row in conc["concurrency"]:
        rps, step = scaling.H100_CONCURRENCY[row["batch"]]
        assert (round(row["requests_s"], 4), round(row["step_ms_p50"], 2)) == (rps, step)
    assert round(conc["runs"][0]["commit_ms_mean"], 2) == scaling.H100_COMMIT_MS
    assert round(anchor["roofline"]["total_gb"], 2) == scaling.ROOFLINE_GB_PER_STEP
    assert round(anchor["roofline"]["step_floor_ms"], 2) == round(scaling.ROOFLINE_GB_PER_STEP / 3350 * 1000, 2)


def test_derived_method_reproduces_the_measured_batch_one():
    """The batch-2/4 derivation, applied at batch 1, lands within 5 % of the measured anchor (doc: 2.43 vs 2.52 s)."""
    d = scaling.derived_latency_s(1)
    assert round(d, 2) == 2.43 and abs(d - scaling.H100_ANCHOR_E2E_S) / scaling.H100_ANCHOR_E2E_S < 0.05


def test_doc_tables_are_generated():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    spec = make_spec("h100", "fp8", 2)
    for table in (scaling.figures_table(), scaling.plan_table(), scaling.scale_up_table(spec.weights_gib)):
        assert table in doc, "docs/scaling.md is stale: regenerate its tables from dgemma.deploy.scaling"
    assert f"({spec.startup_failure_threshold} x 10 s for H100 fp8)" in doc
    q, a = spec.hpa_targets
    assert f"H100, 1 GPU: {q})" in doc and f"H100, 1 GPU: {a})" in doc


def test_worked_example():
    rows = scaling.figures()
    h100 = [r for r in rows if r.gpu == "h100" and r.basis in ("measured", "derived")]
    best = scaling.best_for_latency(h100, 6.0)
    assert best.batch == 4 and scaling.replicas_for(10, best) == 22
    assert scaling.best_for_latency(h100, 3.0).batch == 1 and scaling.replicas_for(10, h100[0]) == 36
    assert scaling.best_for_latency(h100, 1.0) is None
    assert scaling.replicas_for(10, best, utilization=1.0) == math.ceil(10 / best.requests_s)
    with pytest.raises(ValueError):
        scaling.replicas_for(0, best)


@pytest.mark.parametrize("max_batch,gpus,want", [(4, 1, (2, 3)), (8, 4, (16, 24)), (2, 1, (1, 2)), (1, 1, (1, 1))])
def test_hpa_targets(max_batch, gpus, want):
    assert scaling.hpa_targets(max_batch, gpus) == want


def test_startup_budget_and_scale_up_steps():
    assert scaling.load_seconds(24.2) == pytest.approx(2 * 24.2 * 1.073741824 / 0.5 + 120)
    assert scaling.startup_failure_threshold(24.2) == 45 and scaling.startup_failure_threshold(0.1) == 30
    warm, cold = scaling.scale_up_seconds(24.2, image_cached=True), scaling.scale_up_seconds(24.2, engines_cached=False)
    assert warm["total"] == pytest.approx(sum(v for k, v in warm.items() if k != "total"))
    assert cold["total"] - warm["total"] == pytest.approx(scaling.ENGINE_BUILD_S + 60)  # build + image pull
