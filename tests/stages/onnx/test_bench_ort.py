"""`dgemma bench --backend ort` on the exported fp32 graphs of the tiny model (the session's export)."""

import json

from dgemma.cli import main


def test_bench_ort_on_exported_graphs(onnx_dir, tiny_dir, tmp_path, capsys):
    assert main(["bench", "--gpu", "cpu", "--backend", "ort", "--onnx-dir", str(onnx_dir), "--checkpoint",
                 str(tiny_dir), "--scenario", "anchor", "--out", str(tmp_path)]) == 0
    (f,) = (tmp_path / "cpu" / "bf16").glob("*-anchor-ort.json")
    rec = json.loads(f.read_text())
    assert rec["backend"] == "ort" and rec["onnx_precision"] == "fp32" and rec["onnx_dir"] == str(onnx_dir)
    assert rec["threads"] == 1  # GPU=cpu default: repeatable figures on a shared box
    m = rec["metrics"]
    assert m["generation_tok_s"] > 0 and m["denoise_ms_p50"] > 0 and m["prefill_ms"] > 0
    assert all(r["steps_per_canvas"] == [8] * r["canvases"] for r in rec["runs"])  # fixed steps (cpu: 8)
    assert rec["ar_baseline"] == {"available": False, "reason": "OrtBackend has no ar_step"}
    assert "anchor" in capsys.readouterr().out


def test_bench_ort_refuses_graphs_of_another_checkpoint(onnx_dir, tmp_path, capsys):
    # the graphs come from the random tiny checkpoint; the default is the embedded trained one
    assert main(["bench", "--gpu", "cpu", "--backend", "ort", "--onnx-dir", str(onnx_dir), "--scenario", "anchor",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "graphs were exported for a different model config" in err and "make onnx" in err
