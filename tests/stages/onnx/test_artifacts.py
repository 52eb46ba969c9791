"""Stale / corrupt ONNX graphs are refused by ONNX Runtime's backend with the make command that rebuilds."""

from __future__ import annotations

import json
import shutil

import pytest

from dgemma.core.errors import ArtifactError
from dgemma.runtime.ort_backend import OrtBackend


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
