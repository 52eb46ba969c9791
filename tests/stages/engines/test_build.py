"""TensorRT engines: TensorRT-RTX ahead-of-time builds on the CPU (GPU=cpu), the refusals of corrupt or impossible
inputs, and stale engines (their ONNX changed since the build) refused by the check, TrtBackend and the render."""

from __future__ import annotations

import json
import shutil

import pytest

from dgemma.core.errors import ArtifactError, ConfigError
from dgemma.core.manifest import check_engines
from dgemma.engines.build import build_engines
from dgemma.runtime.trt_backend import TrtBackend
from dgemma.serving.render import render


def _rtx():
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing wheel or missing native libs
        pytest.skip(f"tensorrt_rtx not importable ({type(e).__name__}: {e}); pip install -e '.[export]'")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("full `tensorrt` is importable: GPU=cpu AOT builds are TensorRT-RTX only")
    except ImportError:
        pass


@pytest.fixture(scope="module")
def engines(onnx_root, tmp_path_factory):
    _rtx()
    return build_engines("cpu", "bf16", onnx_root, tmp_path_factory.mktemp("engines"), onnx_precision="fp32")


def test_rtx_aot_build(engines, onnx_dir):
    for g in ("encoder", "denoiser"):
        assert (engines / f"{g}.plan").stat().st_size > 100_000
    m = check_engines(engines)
    assert m["compute_capabilities"] == [120, 89] and m["tensorrt"]["flavour"] == "tensorrt_rtx"
    cap = m["engines"]["encoder"]["profile"]["past_key_1"]  # full layer: kv_capacity from one canvas to max_context
    assert m["gpu_profile"]["name"] == "cpu" and [s[2] for s in cap] == [32, 256, 256]


def _engines_of(engines, onnx_copy, dst):
    """A copy of the built engines whose manifest points at `onnx_copy` (identical bytes to the graphs built from)."""
    shutil.copytree(engines, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["onnx_dir"] = str(onnx_copy)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_stale_engines_refused_by_the_check_the_trt_backend_and_the_render(engines, onnx_copy, tmp_path, monkeypatch):
    eng = _engines_of(engines, onnx_copy, tmp_path / "work" / "engines" / "h100" / "fp8")
    check_engines(eng)  # fresh
    (onnx_copy / "manifest.json").write_text((onnx_copy / "manifest.json").read_text() + " ")
    with pytest.raises(ArtifactError, match="stale engines.*make engines GPU=cpu PRECISION=bf16"):
        check_engines(eng)
    with pytest.raises(ArtifactError, match="stale engines"):  # before any GPU or TensorRT question
        TrtBackend(eng)
    monkeypatch.setenv("DGEMMA_WORKDIR", str(tmp_path / "work"))  # render reads engines/<gpu>/<precision> there
    with pytest.raises(ArtifactError, match="stale engines"):
        render("h100", "fp8", out=tmp_path / "repo", engine="tensorrt", backend="bls")
    assert not (tmp_path / "repo" / "models").exists()


def test_build_refuses_corrupt_onnx(onnx_copy, tmp_path):
    _rtx()
    f = onnx_copy / "denoiser" / "model.onnx"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="make onnx"):
        build_engines("cpu", "bf16", onnx_copy.parent, tmp_path / "e", onnx_precision="fp32")
    assert not (tmp_path / "e" / "cpu" / "bf16").exists()


def test_hopper_needs_full_tensorrt(onnx_dir, tmp_path):
    _rtx()
    with pytest.raises(ConfigError, match="full TensorRT.*NGC"):
        build_engines("h100", "bf16", onnx_dir.parent, tmp_path, onnx_precision="fp32")
