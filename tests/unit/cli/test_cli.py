"""CLI: generate on the tiny default, --json schema, streaming, and typed errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from dgemma.cli import main


def test_generate_json_schema_and_seed(tiny_dir, capsys):
    args = ["generate", "--checkpoint", str(tiny_dir), "--prompt", "Why is the sky blue?", "--seed", "3", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("token_ids", "text", "canvases", "steps_per_canvas", "tokens_per_forward"):
        assert key in out
    assert len(out["token_ids"]) == 64 and out["canvases"] == 2 and out["steps_per_canvas"] == [48, 48]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == out["token_ids"]  # deterministic per seed


def test_prompt_ids_steps_and_stream(tiny_dir, capsys):
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt-ids", "2,105,50,51", "--steps", "3",
                 "--max-new-tokens", "1", "--stream"]) == 0
    cap = capsys.readouterr()
    assert "[canvas 1]" in cap.out and "step  3/3" in cap.err


def test_generate_logprobs_json_and_table(capsys):
    """--logprobs K: per new token up to the EOS its log-probability and K alternatives, most likely first; the
    committed token is the step's argmax, so it is the first alternative; the values match the JSON."""
    base = ["generate", "--prompt", "sort: 3 1 4 1 5 9 2 6 5 3", "--seed", "0"]
    assert main(base + ["--logprobs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["logprobs"]
    assert [r["token_id"] for r in rows] == out["token_ids"][: len(rows)] and rows[-1]["token_id"] == 106  # <end_of_turn>
    for r in rows:
        assert r["logprob"] <= 0 and len(r["top"]) == 2 and r["top"][0]["token_id"] == r["token_id"]
        assert r["top"][0]["logprob"] >= r["top"][1]["logprob"] and r["top"][0]["logprob"] == r["logprob"]
    assert main(base + ["--logprobs"]) == 0  # K defaults to 0: the chosen tokens only
    cap = capsys.readouterr()
    table = [line for line in cap.out.splitlines() if line.startswith("  ")]
    assert "-- logprobs" in cap.out and len(table) == len(rows)
    assert float(table[0].split()[-1]) == pytest.approx(rows[0]["logprob"], abs=1e-4)


@pytest.mark.parametrize("extra,msg", [
    (["--logprobs", "6"], "--logprobs must be in 0..5 (got 6)"),
    (["--steps", "0"], "--steps must be in 1..48 (got 0)"),
    (["--steps", "49"], "max_denoising_steps=48"),
    (["--seed", "1.5"], "--seed must be an integer (got '1.5')"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)"),
    (["--max-context", "40"], "exceeds max_context=40"),
    (["--prompt-ids", "2,x"], "--prompt-ids must be comma-separated integers"),
])
def test_user_errors_are_one_line(tiny_dir, capsys, extra, msg):
    base = ["generate", "--checkpoint", str(tiny_dir)]
    if "--prompt-ids" not in extra:
        base += ["--prompt", "hello"]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_module_entry_point_reports_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dgemma", "generate", "--checkpoint", str(tmp_path / "x"),
                        "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2 and "CheckpointError" in r.stderr and "Traceback" not in r.stderr


def test_unknown_backend_lists_valid_ones(tiny_dir, capsys):
    assert main(["generate", "--checkpoint", str(tiny_dir), "--prompt", "hi", "--backend", "tpu"]) == 2
    assert "unknown backend 'tpu'; valid: torch, fast, ort, trt" in capsys.readouterr().err


def test_generate_trt_backend_names_engines_and_gpu(capsys):
    """`dgemma generate --backend trt`: missing engines name the path and the make command; an impossible
    GPU/precision pair names the rule and the pairs that work."""
    from dgemma.cli import main

    assert main(["generate", "--backend", "trt", "--gpu", "rtx5090", "--precision", "fp8", "--prompt", "x"]) != 0
    err = capsys.readouterr().err
    assert "engines/rtx5090/fp8/manifest.json not found" in err and "make engines GPU=rtx5090 PRECISION=fp8" in err
    assert main(["generate", "--backend", "trt", "--gpu", "h100", "--precision", "nvfp4", "--prompt", "x"]) != 0
    assert "--gpu b200/rtx5090/dgx-spark for nvfp4" in capsys.readouterr().err
