"""Quantize outputs shared by the quantization tests and the quantized-ONNX tests (one ModelOpt calibration per
precision for the whole session: the slowest fixture of the CPU suite)."""

import json
import random

import pytest


def _write_prompts(path, seed, n, generic=()):
    from dgemma.tiny.task import SortTask

    rng = random.Random(seed)
    rows = [SortTask().example(rng)[0] for _ in range(n)] + list(generic)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    return (_write_prompts(d / "calib.jsonl", 7, 6, ["What is the capital of France?"]),
            _write_prompts(d / "heldout.jsonl", 8, 6))


@pytest.fixture(scope="session")
def outputs(tmp_path_factory, prompt_files):
    """{precision: quantize/<precision>/} written by dgemma.stage.run (read-only for the tests)."""
    pytest.importorskip("modelopt.torch.quantization")
    from dgemma.quantize import recipe, stage

    out = tmp_path_factory.mktemp("quantize")
    calib, held = prompt_files
    return {p: stage.run(p, out=out, calib=calib, heldout=held, eval_n=10) for p in recipe.PRECISIONS}
