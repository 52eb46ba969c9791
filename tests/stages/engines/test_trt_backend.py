"""TrtBackend: engines built for another GPU or TensorRT are refused at load with both sides named (the run on a
CUDA GPU with TensorRT is tests/gpu/test_trt_engines.py)."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma.core.errors import ArtifactError, ConfigError
from dgemma.core.manifest import read_engine_manifest
from dgemma.runtime.trt_backend import TrtBackend, check_compatible

MANIFEST = {"gpu_profile": {"name": "rtx5090"}, "precision": "fp8", "compute_capabilities": [120, 89],
            "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"}}


def test_same_gpu_and_tensorrt_accepted():
    check_compatible(MANIFEST, 89, "NVIDIA GeForce RTX 4090", "tensorrt_rtx", "1.7.1.116")
    check_compatible(MANIFEST, 120, "NVIDIA GeForce RTX 5090", "tensorrt_rtx", "1.7.1.116")


def test_other_gpu_refused_naming_both_sides():
    with pytest.raises(ArtifactError) as e:
        check_compatible(MANIFEST, 90, "NVIDIA H100 80GB HBM3", "tensorrt_rtx", "1.7.1.116")
    msg = str(e.value)
    assert "SM120, SM89" in msg and "rtx5090" in msg and "H100" in msg and "SM90" in msg and "make engines" in msg


@pytest.mark.parametrize("flavour,version", [("tensorrt", "10.13.0"), ("tensorrt_rtx", "1.8.0")])
def test_other_tensorrt_refused(flavour, version):
    with pytest.raises(ArtifactError) as e:
        check_compatible(MANIFEST, 120, "NVIDIA GeForce RTX 5090", flavour, version)
    msg = str(e.value)
    assert "tensorrt_rtx 1.7.1.116" in msg and f"{flavour} {version}" in msg and "make engines" in msg


def test_missing_engines_named(tmp_path):
    with pytest.raises(ArtifactError, match="make engines"):
        read_engine_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_engine_manifest(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_no_gpu_refused_with_the_alternative(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(ConfigError, match="--backend ort"):
        TrtBackend(tmp_path)
