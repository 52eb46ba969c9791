"""TrtBackend: engines built for another GPU or TensorRT are refused at load with both sides named; on a CUDA GPU
with TensorRT the engines run the sampler (marked gpu; skipped here with the reason)."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma.errors import ArtifactError, ConfigError
from dgemma.runtime.trt_backend import TrtBackend, check_compatible, read_engine_manifest

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


@pytest.mark.gpu
def test_engines_run_the_sampler_on_gpu(onnx_root, tiny_dir, tmp_path):
    """On a GPU with TensorRT: build for this GPU and check logits against the torch model (bf16 tolerance)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("full `tensorrt` is not importable on this GPU machine (NGC container needed)")
    from dgemma.checkpoint import load_checkpoint
    from dgemma.engine_build import build_engines
    from dgemma.profiles import for_device
    from dgemma.runtime.torch_backend import TorchBackend

    gpu = for_device(torch.cuda.get_device_name())
    eng = build_engines(gpu, "bf16", onnx_root, tmp_path, onnx_precision="fp32")
    tb = TrtBackend(eng)
    ref = TorchBackend(load_checkpoint(tiny_dir).model.cuda().float())
    ids = torch.randint(0, tb.vocab_size, (1, 12), device="cuda")
    st, sr = tb.new_state(1), ref.new_state(1)
    tb.encode(st, ids)
    ref.encode(sr, ids)
    canvas = torch.randint(0, tb.vocab_size, (1, tb.canvas_length), device="cuda")
    lt, _ = tb.denoise(st, canvas, None, torch.tensor(0.7))
    lr, _ = ref.denoise(sr, canvas, None, torch.tensor(0.7))
    assert float((lt - lr).abs().max() / lr.abs().max()) < 1e-2
