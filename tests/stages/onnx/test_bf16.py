"""The production path on CPU: bf16 graphs (`make onnx`) -> TensorRT-RTX AOT engines (`make engines GPU=cpu`)."""

from __future__ import annotations

import onnx
import pytest


def test_bf16_export_and_rtx_build(tiny_dir, tmp_path):
    from dgemma.cli import main

    assert main(["export", "--precision", "bf16", "--checkpoint", str(tiny_dir), "--out", str(tmp_path / "onnx")]) == 0
    proto = onnx.load(str(tmp_path / "onnx" / "bf16" / "denoiser" / "model.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types["sc_embeds"] == onnx.TensorProto.BFLOAT16 and types["temperature"] == onnx.TensorProto.FLOAT
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"tensorrt_rtx not importable ({e}); pip install -e '.[export]'")
    assert main(["build", "--gpu", "cpu", "--precision", "bf16", "--onnx", str(tmp_path / "onnx"),
                 "--out", str(tmp_path / "engines")]) == 0
    for g in ("encoder", "denoiser"):
        assert (tmp_path / "engines" / "cpu" / "bf16" / f"{g}.plan").stat().st_size > 0
