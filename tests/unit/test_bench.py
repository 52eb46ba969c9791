"""Benchmark arithmetic on synthetic traces, the roofline against hand-computed figures, reduced CPU runs."""

import json

import pytest

from dgemma.bench import Scenario, derive, percentile, roofline
from dgemma.cli import main
from dgemma.config import FULL_SIZE
from dgemma.profiles import PROFILES, Precision


def _trace():
    t = [{"kind": "prefill", "t0": 0.0, "t1": 0.10}]
    now = 0.10
    for canvas in range(2):
        for step in range(3):
            t.append({"kind": "denoise", "t0": now, "t1": now + 0.008})
            t.append({"kind": "step", "t0": now, "t1": now + 0.010})
            now += 0.010
        t.append({"kind": "canvas", "t0": None, "t1": now})
        if canvas == 0:
            t.append({"kind": "commit", "t0": now, "t1": now + 0.020})
            now += 0.020
    return t


def test_derive_metrics_on_a_synthetic_trace():
    m = derive(_trace(), committed_tokens=512)
    # generation: first step 0.10 -> last canvas 0.18 = 0.08 s (6 steps + 1 commit)
    assert m["generation_s"] == pytest.approx(0.08)
    assert m["generation_tok_s"] == pytest.approx(512 / 0.08)
    assert m["e2e_tok_s"] == pytest.approx(512 / 0.18)
    assert m["prefill_ms"] == pytest.approx(100)
    assert m["time_to_first_canvas_ms"] == pytest.approx(130)
    assert m["step_ms_p50"] == pytest.approx(10) and m["denoise_ms_p99"] == pytest.approx(8)
    assert m["commit_ms_mean"] == pytest.approx(20)
    assert m["steps_per_canvas"] == [3, 3] and m["tokens_per_forward"] == pytest.approx(512 / 6)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 99) == pytest.approx(99)


def test_roofline_h100_fp8_hand_computed():
    r = roofline(FULL_SIZE, Precision.FP8, prefix=1536, hbm_gbs=PROFILES["h100"].hbm_gbs)
    b = r["bytes"]
    assert b["attention_weights"] == 1_110_179_840  # 25 sliding x 34,603,008 + 5 full x 49,020,928
    assert b["dense_mlp_router_weights"] == 563_920_896  # 30 x (17,842,176 + 360,448) + 17,842,176
    assert b["expert_weights"] == pytest.approx(22_837_985_280, rel=1e-6)  # 30 x 128 x 3 x 2816 x 704
    assert b["embedding_lm_head_and_soft_embed"] == 2_952_790_016  # 2 reads x 262144 x 2816 x 2 B
    assert b["kv_cache"] == 240_967_680  # 25 x 1023 tok x 8 KiB... + 5 x 1536 tok x 4 KiB, K and V
    assert b["logits_fp32_write_read"] == 536_870_912
    assert r["total_gb"] == pytest.approx(28.2427, abs=1e-3)
    assert r["step_floor_ms"] == pytest.approx(28.2427 / 3350 * 1e3, rel=1e-4)  # 8.43 ms
    assert r["ceiling_tok_s_at_16_steps"] == pytest.approx(256 / (16 * 8.4307e-3), rel=1e-3)


def test_roofline_h200_bf16_hand_computed():
    r = roofline(FULL_SIZE, Precision.BF16, prefix=1536, hbm_gbs=PROFILES["h200"].hbm_gbs)
    assert r["total_gb"] == pytest.approx(52.7548, abs=1e-3)
    assert r["step_floor_ms"] == pytest.approx(10.9906, abs=1e-3)


def test_scenarios_load_and_fit_cpu():
    sc = Scenario.load("anchor")
    assert (sc.steps, sc.adaptive, sc.prompt_tokens, sc.max_new_tokens) == (16, False, 1024, 1024)
    from dgemma.config import TINY

    small = sc.fit(PROFILES["cpu"], TINY)
    assert small.prompt_tokens == 64 and small.max_new_tokens <= 256 - 64 and small.repeats == 1
    full = sc.fit(PROFILES["h100"], FULL_SIZE)
    assert (full.prompt_tokens, full.max_new_tokens) == (1024, 1024)


def test_bench_cpu_writes_results(tmp_path, tiny_dir, capsys):
    assert main(["bench", "--gpu", "cpu", "--checkpoint", str(tiny_dir), "--scenario",
                 "anchor,adaptive,concurrency,long-context", "--out", str(tmp_path)]) == 0
    files = sorted((tmp_path / "cpu" / "bf16").glob("*.json"))
    assert len(files) == 4
    rec = {json.loads(f.read_text())["scenario"]["name"]: json.loads(f.read_text()) for f in files}
    a = rec["anchor"]
    for k in ("environment", "telemetry", "roofline", "metrics", "runs", "gpu_profile", "scenario"):
        assert k in a
    assert a["telemetry"]["available"] is False and "no GPU" in a["telemetry"]["reason"]
    assert a["metrics"]["generation_tok_s"] > 0 and a["ar_baseline"]["available"]
    assert a["metrics"]["diffusion_over_ar"] == pytest.approx(
        a["metrics"]["generation_tok_s"] / a["ar_baseline"]["tok_s"])
    assert all(r["steps_per_canvas"] == [8] * len(r["steps_per_canvas"]) for r in a["runs"])  # fixed steps
    assert [c["batch"] for c in rec["concurrency"]["concurrency"]] == [1, 2]
    assert [x["prompt_tokens"] for x in rec["long-context"]["long_context"]] == [16, 32, 64]
    assert "gen" in capsys.readouterr().out


def test_bench_bad_inputs(tmp_path, capsys):
    assert main(["bench", "--gpu", "cpu", "--scenario", "nope", "--out", str(tmp_path)]) == 2
    assert "scenario 'nope' not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbogus = 1\n')
    assert main(["bench", "--gpu", "cpu", "--scenario", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_report_markdown_and_plots(tmp_path, tiny_dir, capsys):
    res = tmp_path / "results"
    assert main(["bench", "--gpu", "cpu", "--checkpoint", str(tiny_dir), "--scenario", "anchor,concurrency",
                 "--out", str(res)]) == 0
    assert main(["report", "--gpu", "cpu", "--results", str(res), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "cpu-bf16.md").read_text()
    assert "| anchor | torch |" in md and "not collected: no GPU" in md and "| batch | gen tok/s |" in md
    for png in ("cpu-bf16-step-latency.png", "cpu-bf16-steps-per-canvas.png", "cpu-bf16-concurrency.png",
                "cpu-bf16-vs-anchors.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000 and f"]({png})" in md
    assert main(["report", "--results", str(res), "--out", str(tmp_path / "rep")]) == 0
    assert "| cpu | bf16 | anchor | torch |" in (tmp_path / "rep" / "all.md").read_text()
    assert main(["report", "--gpu", "h100", "--precision", "fp8", "--results", str(res),
                 "--out", str(tmp_path / "rep")]) == 2
    assert "make bench GPU=h100 PRECISION=fp8" in capsys.readouterr().err
