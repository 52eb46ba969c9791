"""perf_analyzer and genai-perf against the session's `dgemma` ensemble, with the commands of
docs/benchmarking.md in a reduced form. The tools live outside the project venv (`make perf-tools`); without
them these tests skip and say so."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "build" / "tools"


def tool(name: str) -> str:
    path = TOOLS / "bin" / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed: run `make perf-tools` (build/tools/bin/{name})")
    return found


def test_perf_analyzer_streams_the_ensemble(triton, tmp_path):
    out = tmp_path / "pa.csv"
    cmd = [tool("perf_analyzer"), "-m", "dgemma", "-i", "grpc", "-u", triton.grpc_url, "--streaming",
           "--input-data", str(ROOT / "bench" / "perf" / "dgemma-inputs.json"), "--concurrency-range", "1",
           "--measurement-mode", "count_windows", "--measurement-request-count", "4",
           "--stability-percentage", "999", "--max-trials", "5", "-f", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Detected decoupled model" in p.stdout
    (row,) = list(csv.DictReader(out.open()))
    assert row["Concurrency"] == "1" and float(row["Inferences/Second"]) > 0
    # streaming: one canvas response + the statistics response per request
    assert float(row["Response Throughput"]) >= float(row["Inferences/Second"])


def genai_perf(tmp_path, *endpoint: str) -> dict:
    """Run `genai-perf profile` (4 requests, concurrency 1) against `endpoint`; -> its profile_export JSON."""
    tokenizer = TOOLS / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        pytest.skip("genai-perf tokenizer missing: run `make perf-tools` (build/tools/tokenizer)")
    cmd = [tool("genai-perf"), "profile", "-m", "dgemma", *endpoint, "--streaming", "--tokenizer", str(tokenizer),
           "--num-prompts", "4", "--synthetic-input-tokens-mean", "16", "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", "32", "--concurrency", "1", "--request-count", "4", "--warmup-request-count", "1",
           "--artifact-dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (f,) = tmp_path.glob("*/profile_export_genai_perf.json")
    return json.loads(f.read_text())


def test_genai_perf_profiles_generate_stream(triton, tmp_path):
    stats = genai_perf(tmp_path, "--endpoint-type", "generate", "--endpoint", "v2/models/dgemma/generate_stream",
                       "-u", triton.http_url, "--extra-inputs", "max_denoising_steps:8")
    assert stats["request_throughput"]["avg"] > 0 and stats["output_token_throughput"]["avg"] > 0
    assert stats["request_count"]["avg"] == 4 and stats["time_to_first_token"]["avg"] > 0


def test_genai_perf_profiles_over_grpc_kserve(triton, tmp_path):
    """genai-perf's gRPC (kserve) path sends exclude_input_in_output, which the model accepts (and ignores)."""
    stats = genai_perf(tmp_path, "--endpoint-type", "kserve", "--backend", "tensorrtllm", "-u", triton.grpc_url)
    assert stats["request_throughput"]["avg"] > 0 and stats["request_count"]["avg"] == 4
