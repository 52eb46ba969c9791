"""Export fixtures: the tiny random checkpoint exported once per session (fp32, through the CLI)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def onnx_root(tiny_dir, tmp_path_factory):
    from dgemma.cli import main

    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--precision", "fp32", "--checkpoint", str(tiny_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def onnx_dir(onnx_root):
    return onnx_root / "fp32"


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from dgemma.checkpoint import load_checkpoint

    return load_checkpoint(tiny_dir).model
