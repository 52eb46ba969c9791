"""`dgemma bench --backend triton` against the session's tritonserver: a handful of streamed requests, a
two-level concurrency sweep, every answer checked against in-process generation of the same prompt and seed."""

from __future__ import annotations

import json

import pytest

from dgemma.cli import main

SCENARIO = """name = "served-smoke"
description = "reduced Triton run for the tests"
prompt_tokens = 40
max_new_tokens = 64
steps = 4
adaptive = false
ignore_eos = true
repeats = 1
warmup = 0
batches = [1, 2]
rounds = 1
"""


def test_bench_through_triton_grpc(triton, tmp_path, capsys):
    sc = tmp_path / "served-smoke.toml"
    sc.write_text(SCENARIO)
    out = tmp_path / "results"
    assert main(["bench", "--gpu", "cpu", "--backend", "triton", "--url", triton.grpc_url, "--scenario", str(sc),
                 "--out", str(out)]) == 0
    (f,) = (out / "cpu" / "bf16").glob("*-served-smoke-triton.json")
    rec = json.loads(f.read_text())
    assert rec["backend"] == "triton" and rec["triton"]["url"] == triton.grpc_url
    assert rec["triton"]["server"] == "external (--url)" and rec["all_correct"] is True
    # the reference runs what the server's canvas loop runs (ORT in-process on GPU=cpu), same thread count
    assert rec["triton"]["canvas_loop_backend"] == "ort" and rec["triton"]["in_process_reference"] == "ort on cpu"
    (run,) = rec["runs"]
    assert run["canvases"] == 2 and run["steps_per_canvas"] == [4, 4]  # adaptive = false: fixed steps, served too
    assert 0 < run["committed_tokens"] <= 64 and run["identical_to_in_process"] is True
    assert run["time_to_first_canvas_ms"] > 0 and run["generation_tok_s"] > 0
    for k in ("step_ms_p50", "denoise_ms_p50", "prefill_ms", "commit_ms_mean"):  # not observable: None + reason
        assert run[k] is None and rec["metrics"].get(k) is None and rec["unobserved"][k]
    assert [(c["concurrency"], c["requests"], c["errors"]) for c in rec["concurrency"]] == [(1, 1, 0), (2, 2, 0)]
    for c in rec["concurrency"]:
        assert c["all_correct"] and c["identical_to_in_process"] == c["requests"]
        assert c["requests_s"] > 0 and c["tok_s"] > 0 and c["latency_ms_p99"] >= c["latency_ms_p50"] > 0
    o = rec["triton_overhead"]
    assert o["available"] and o["requests"] == 3 and o["ratio_per_request"] > 0  # 1 run + 2 pool prompts
    assert o["e2e_ms_in_process_p50"] > 0 and o["overhead_ms_per_step"] is not None
    assert rec["ar_baseline"]["available"] is False and rec["telemetry"]["available"] is False
    assert rec["served_sampler"]["adaptive_stopping"] is False and "note" not in rec["served_sampler"]
    printed = capsys.readouterr()
    assert "concurrency   2:" in printed.out and "Triton / in-process: x" in printed.out
    assert "concurrency 2: 2/2 requests" in printed.err  # progress line


def test_bench_starts_and_stops_its_own_server(tmp_path, monkeypatch, capsys, onnx_fp32):
    """Without --url: renders the repository (into the work directory, here tmp), starts tritonserver, stops it at
    the end."""
    import signal
    import socket

    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "onnx").symlink_to(onnx_fp32.parent)  # the server's ORT loop reads build/onnx/fp32
    monkeypatch.setenv("DGEMMA_WORKDIR", str(tmp_path))
    sc = tmp_path / "one.toml"
    sc.write_text(SCENARIO.replace("batches = [1, 2]\n", "").replace('name = "served-smoke"', 'name = "one"'))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["bench", "--gpu", "cpu", "--backend", "triton", "--no-reference", "--scenario", str(sc),
                 "--out", str(tmp_path / "results")]) == 0
    (f,) = (tmp_path / "results" / "cpu" / "bf16").glob("*-one-triton.json")
    rec = json.loads(f.read_text())
    assert rec["triton"]["server"] == "started by dgemma bench" and rec["all_correct"]
    assert rec["triton_overhead"] == {"available": False,
                                      "reason": "--no-reference: no in-process generation to compare with"}
    assert rec["runs"][0]["identical_to_in_process"] is None and rec["runs"][0]["canvases"] == 2
    assert (tmp_path / "build" / "triton" / "cpu" / "bf16" / "models" / "dgemma" / "config.pbtxt").exists()
    host, port = rec["triton"]["url"].split(":")
    with pytest.raises(OSError):  # the server is gone
        socket.create_connection((host, int(port)), timeout=2).close()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "starting tritonserver" in capsys.readouterr().err
