"""Stale / corrupt artifacts are refused with the make command that rebuilds; TensorRT-RTX AOT engine builds."""

from __future__ import annotations

import json
import shutil

import pytest

from dgemma.errors import ArtifactError, ConfigError
from dgemma.runtime.ort_backend import OrtBackend


@pytest.fixture
def onnx_copy(onnx_dir, tmp_path):
    dst = tmp_path / "onnx" / "fp32"
    shutil.copytree(onnx_dir, dst)
    return dst


def test_stale_checkpoint_refused(onnx_copy, tiny_dir, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-5  # the checkpoint changed after export
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="stale ONNX.*make onnx"):
        OrtBackend(onnx_copy, checkpoint=ck)


def test_contract_mismatch_refused(onnx_copy):
    m = json.loads((onnx_copy / "manifest.json").read_text())
    m["contract_sha256"] = "0" * 16
    (onnx_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="IO contract 0000.*make onnx"):
        OrtBackend(onnx_copy)


def test_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="not found.*make onnx"):
        OrtBackend(tmp_path)


def test_truncated_onnx_refused(onnx_copy):
    f = onnx_copy / "denoiser" / "model.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="corrupt or partial.*make onnx"):
        OrtBackend(onnx_copy)


def test_corrupt_onnx_bytes_refused(onnx_copy):
    f = onnx_copy / "encoder" / "model.onnx"
    f.write_bytes(b"\xff" * f.stat().st_size)  # same size: caught by the sha256
    with pytest.raises(ArtifactError, match="modified or corrupt.*make onnx"):
        OrtBackend(onnx_copy)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load.*make onnx"):
        OrtBackend(onnx_copy, verify=False)


# -- TensorRT-RTX ---------------------------------------------------------------------------------------------
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
    from dgemma.engine_build import build_engines

    return build_engines("cpu", "bf16", onnx_root, tmp_path_factory.mktemp("engines"), onnx_precision="fp32")


def test_rtx_aot_build(engines, onnx_dir):
    from dgemma.engine_build import check_engines

    for g in ("encoder", "denoiser"):
        assert (engines / f"{g}.plan").stat().st_size > 100_000
    m = check_engines(engines, onnx_dir.parent)
    assert m["compute_capabilities"] == [120, 89] and m["tensorrt"]["flavour"] == "tensorrt_rtx"
    cap = m["engines"]["encoder"]["profile"]["past_key_1"]  # full layer: kv_capacity from one canvas to max_context
    assert m["gpu_profile"]["name"] == "cpu" and [s[2] for s in cap] == [32, 256, 256]


def test_stale_engines_refused(engines, onnx_copy):
    from dgemma.engine_build import check_engines

    shutil.copytree(engines, onnx_copy.parent / "eng")
    (onnx_copy / "manifest.json").write_text((onnx_copy / "manifest.json").read_text() + " ")
    with pytest.raises(ArtifactError, match="stale engines.*make engines GPU=cpu PRECISION=bf16"):
        check_engines(onnx_copy.parent / "eng", onnx_copy.parent)


def test_build_refuses_corrupt_onnx(onnx_copy, tmp_path):
    _rtx()
    from dgemma.engine_build import build_engines

    f = onnx_copy / "denoiser" / "model.onnx"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="make onnx"):
        build_engines("cpu", "bf16", onnx_copy.parent, tmp_path / "e", onnx_precision="fp32")
    assert not (tmp_path / "e" / "cpu" / "bf16").exists()


def test_hopper_needs_full_tensorrt(onnx_dir, tmp_path):
    _rtx()
    from dgemma.engine_build import build_engines

    with pytest.raises(ConfigError, match="full TensorRT.*NGC"):
        build_engines("h100", "bf16", onnx_dir.parent, tmp_path, onnx_precision="fp32")
