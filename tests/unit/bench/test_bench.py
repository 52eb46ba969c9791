"""Benchmark arithmetic on synthetic traces, the roofline against hand-computed figures, reduced CPU runs."""

import json

import pytest
import torch

from dgemma.bench.metrics import derive, roofline, summarize
from dgemma.bench.scenario import Scenario
from dgemma.core.stats import percentile
from dgemma.cli import main
from dgemma.core.config import FULL_SIZE
from dgemma.core.profiles import PROFILES, Precision


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
    from dgemma.core.config import TINY

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


def _add_triton_record(d):
    """A Triton-shaped result next to real in-process ones (schema of dgemma.bench.served.run_served_scenario)."""
    from dgemma.bench.served import UNOBSERVED, level_metrics, overhead, request_metrics

    rec = json.loads(next(d.glob("*-anchor-torch.json")).read_text())
    run = request_metrics(_timed(), 32)
    run["problems"] = []
    rows = []
    for t0, end in [(0.0, 0.41), (0.0, 0.41), (0.4, 0.81), (0.4, 0.81)]:
        m = request_metrics(_timed(t_send=t0, arrivals=(t0 + 0.1, t0 + 0.15, t0 + 0.2, end)), 32)
        m["problems"] = []
        rows.append(m)
    rec.update(backend="triton", runs=[run], metrics=summarize([run]), unobserved=UNOBSERVED,
               concurrency=[level_metrics(1, rows[:1], 0.0, 0.41), level_metrics(2, rows, 0.0, 0.81)],
               triton_overhead=overhead([(run, {"e2e_s": 0.105, "steps_per_canvas": [4, 5, 5],
                                                "inter_canvas_ms_per_step": 8.0})]),
               ar_baseline={"available": False, "reason": "in-process only"})
    rec["scenario"]["name"] = "concurrency"
    (d / "20990101T000000Z-test-concurrency-triton.json").write_text(json.dumps(rec))


def test_report_markdown_and_plots(tmp_path, tiny_dir, capsys):
    res = tmp_path / "results"
    assert main(["bench", "--gpu", "cpu", "--checkpoint", str(tiny_dir), "--scenario", "anchor,concurrency",
                 "--out", str(res)]) == 0
    _add_triton_record(res / "cpu" / "bf16")
    assert main(["report", "--gpu", "cpu", "--results", str(res), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "cpu-bf16.md").read_text()
    assert "| anchor | torch |" in md and "not collected: no GPU" in md and "| batch | gen tok/s |" in md
    # what is true for the CPU: the tiny model's real size (not "0.00 B"), no roofline floor (not "nan ms")
    from dgemma.core.config import TINY

    assert f"({TINY.param_count():,} text params" in md and "0.00 B" not in md and "nan" not in md
    assert "profile has no memory bandwidth, so there is no floor" in md
    # the Triton concurrency sweep: its table, the overhead line, unobserved columns shown as –
    assert "| concurrency | requests | requests/s | tok/s | latency p50 / p99 ms |" in md
    assert "| 2 | 4 | 4.94 | 474.1 | 410.0 / 410.0 |" in md and "**x2.00 per request**" in md
    assert "| concurrency | triton | 640.0 | 457.1 | – / – | – |" in md
    for png in ("cpu-bf16-step-latency.png", "cpu-bf16-steps-per-canvas.png", "cpu-bf16-concurrency.png",
                "cpu-bf16-vs-anchors.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000 and f"]({png})" in md
    assert main(["report", "--results", str(res), "--out", str(tmp_path / "rep")]) == 0
    assert "| cpu | bf16 | anchor | torch |" in (tmp_path / "rep" / "all.md").read_text()
    assert main(["report", "--gpu", "h100", "--precision", "fp8", "--results", str(res),
                 "--out", str(tmp_path / "rep")]) == 2
    assert "make bench GPU=h100 PRECISION=fp8" in capsys.readouterr().err


# -- Triton (gRPC client side): arithmetic on synthetic timelines ------------------------------------------------
def _timed(t_send=0.0, arrivals=(0.10, 0.15, 0.20, 0.21), steps=(4, 5, 5), tokens=96, canvases=3):
    from dgemma.bench.served import Timed

    t = Timed("p", 0, t_send=t_send)
    for i, at in enumerate(arrivals[:-1]):  # one response per committed canvas, then the statistics
        t.responses.append({"text_output": f"c{i} ", "canvas_index": i, "canvases": i + 1,
                            "steps_per_canvas": list(steps[: i + 1]), "tokens_per_forward": 0.0})
        t.t_responses.append(at)
    t.responses.append({"text_output": "", "canvas_index": canvases, "canvases": canvases,
                        "steps_per_canvas": list(steps), "tokens_per_forward": tokens / sum(steps)})
    t.t_responses.append(arrivals[-1])
    t.t_done = arrivals[-1]
    return t


def test_served_request_metrics_on_a_synthetic_timeline():
    from dgemma.bench.served import UNOBSERVED, request_metrics

    m = request_metrics(_timed(), canvas_length=32)
    assert m["committed_tokens"] == 96 and m["canvases"] == 3 and m["steps_per_canvas"] == [4, 5, 5]
    assert m["e2e_s"] == pytest.approx(0.21) and m["e2e_tok_s"] == pytest.approx(96 / 0.21)
    assert m["time_to_first_canvas_ms"] == pytest.approx(100)
    # inter-canvas rate: 2 canvases of 32 between the first (0.10) and the last (0.20) arrival
    assert m["generation_tok_s"] == pytest.approx(640) and m["step_ms_mean"] == pytest.approx(10)  # 100 ms / 10 steps
    assert m["text"] == "c0 c1 c2 " and m["mean_steps_per_canvas"] == pytest.approx(14 / 3)
    for k in UNOBSERVED:  # not observable through gRPC: None, never invented
        assert m[k] is None
    one = request_metrics(_timed(arrivals=(0.1, 0.11), steps=(4,), tokens=32, canvases=1), 32)
    assert one["generation_tok_s"] is None and one["step_ms_mean"] is None and one["committed_tokens"] == 32


def test_served_checks_level_metrics_and_overhead():
    from dgemma.bench.served import Timed, check_answer, level_metrics, overhead, request_metrics

    ok = request_metrics(_timed(), 32)
    assert check_answer(ok, canvases=3, canvas_length=32, max_steps=8, ref={"committed_tokens": 96}) == []
    assert "in-process generation has 95" in check_answer(ok, 3, 32, 8, {"committed_tokens": 95})[0]
    assert "expected 4" in check_answer(ok, 4, 32, 8, None)[0]
    assert "outside 1..4" in check_answer(ok, 3, 32, 4, None)[0]
    failed = request_metrics(Timed("p", 0, error="boom"), 32)
    assert check_answer(failed, 3, 32, 8, None) == ["boom"] and failed["committed_tokens"] == 0

    rows = []
    for i, (t0, end) in enumerate([(0.0, 0.21), (0.0, 0.41), (0.2, 0.61), (0.4, 0.81)]):
        m = request_metrics(_timed(t_send=t0, arrivals=(t0 + 0.1, t0 + 0.15, t0 + 0.2, end)), 32)
        m["problems"], m["identical_to_in_process"] = ([] if i else ["bad"]), True
        rows.append(m)
    lv = level_metrics(2, rows, 0.0, 0.81)
    assert lv["requests"] == 4 and lv["requests_s"] == pytest.approx(4 / 0.81)
    assert lv["tok_s"] == pytest.approx(4 * 96 / 0.81) and lv["committed_tokens"] == 384
    lat = [210, 410, 410, 410]  # ms, sent -> last response
    assert lv["latency_ms_p50"] == pytest.approx(410) and lv["latency_ms_p99"] == pytest.approx(percentile(lat, 99))
    assert lv["ttfc_ms_p50"] == pytest.approx(100)
    assert lv["all_correct"] is False and lv["problems"] == ["request 0: bad"] and lv["identical_to_in_process"] == 4

    inproc = {"e2e_s": 0.105, "steps_per_canvas": [4, 5, 5], "inter_canvas_ms_per_step": 8.0}
    o = overhead([(ok, inproc), (failed, inproc)])  # failed requests are left out
    assert o["requests"] == 1 and o["ratio_per_request"] == pytest.approx(2.0)
    assert o["overhead_ms_per_request"] == pytest.approx(105) and o["overhead_ms_per_step"] == pytest.approx(7.5)
    assert o["ratio_per_step"] == pytest.approx(10 / 8) and o["step_ms_in_process"] == pytest.approx(8)
    assert overhead([(failed, inproc)])["available"] is False


def test_scenario_fit_served_sweeps_concurrency_to_four_times_max_batch():
    from dgemma.core.config import TINY

    sc = Scenario.load("concurrency")
    assert sc.fit(PROFILES["cpu"], TINY, served=True).batches == (1, 2, 4, 8)
    assert sc.fit(PROFILES["cpu"], TINY).batches == (1, 2)  # in-process batch: KV buffers hold max_batch
    assert sc.fit(PROFILES["h100"], FULL_SIZE, served=True).batches == (1, 2, 4, 8, 16)
    assert sc.fit(PROFILES["h200"], FULL_SIZE, served=True).batches == (1, 2, 4, 8, 16, 32)
    assert sc.fit(PROFILES["cpu"], TINY, served=True).rounds == 2 and sc.rounds == 4


def test_bench_trt_on_cpu_is_a_clear_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "bench", "--gpu", "h100", "--precision", "fp8", "--backend", "trt"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/engines/h100/fp8/manifest.json not found" in err
    assert "make engines GPU=h100 PRECISION=fp8" in err
    (tmp_path / "engines" / "cpu" / "bf16").mkdir(parents=True)
    (tmp_path / "engines" / "cpu" / "bf16" / "manifest.json").write_text("{}")
    assert main(["--workdir", str(tmp_path), "bench", "--gpu", "cpu", "--backend", "trt"]) == 2
    if not torch.cuda.is_available():
        assert "ConfigError: TrtBackend runs engines on a CUDA GPU and none is visible" in capsys.readouterr().err


def test_bench_backend_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--gpu", "cpu", "--backend", "ort", "--onnx-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'none'}/manifest.json not found" in capsys.readouterr().err
    assert main(["bench", "--gpu", "cpu", "--backend", "tensorflow", "--out", str(tmp_path)]) == 2
    assert "unknown backend 'tensorflow'; valid: torch, fast, ort, trt, triton" in capsys.readouterr().err
    assert main(["bench", "--gpu", "cpu", "--url", "127.0.0.1:1", "--out", str(tmp_path)]) == 2
    assert "needs --backend triton" in capsys.readouterr().err


def test_bench_ort_without_graphs_names_the_path_and_the_make_command(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "bench", "--gpu", "cpu", "--backend", "ort"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/build/onnx/fp32/manifest.json not found" in err and "make onnx PRECISION=fp32" in err


def test_server_delta_reads_loop_steps_and_graph_batches():
    """What `dgemma loadtest` measured, folded into the served sweep: per level, the denoising steps and mean step
    time the loop saw (dgemma_graph_seconds), the mean rows per batched step (dgemma_rows_per_step) and each graph
    model's executions by batch size."""
    from dgemma.bench.served import server_delta

    a = {"batches": {"dgemma": {}, "denoiser": {1: 10, 2: 3}},
         "metrics": {'dgemma_graph_seconds_count{graph="denoiser",model="dgemma"}': 100.0,
                     'dgemma_graph_seconds_sum{graph="denoiser",model="dgemma"}': 0.5,
                     'dgemma_graph_seconds_count{graph="encoder",model="dgemma"}': 9.0,
                     'dgemma_rows_per_step_sum{model="dgemma"}': 130.0, 'dgemma_rows_per_step_count{model="dgemma"}': 100.0}}
    b = {"batches": {"dgemma": {}, "denoiser": {1: 12, 2: 7, 4: 1}},
         "metrics": {'dgemma_graph_seconds_count{graph="denoiser",model="dgemma"}': 120.0,
                     'dgemma_graph_seconds_sum{graph="denoiser",model="dgemma"}': 0.6,
                     'dgemma_graph_seconds_count{graph="encoder",model="dgemma"}': 12.0,
                     'dgemma_rows_per_step_sum{model="dgemma"}': 180.0, 'dgemma_rows_per_step_count{model="dgemma"}': 120.0}}
    d = server_delta(a, b)
    assert d["denoise_steps_in_loop"] == 20 and d["step_ms_in_loop"] == pytest.approx(5.0)
    assert d["mean_rows_per_step"] == pytest.approx(50 / 20)
    assert d["batch_sizes"] == {"denoiser": {1: 2, 2: 4, 4: 1}}
    assert d["mean_denoiser_batch"] == pytest.approx((2 + 8 + 4) / 7)
    assert server_delta({"batches": {}}, {"batches": {}}) == {}  # no metrics endpoint: nothing invented
