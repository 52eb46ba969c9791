"""On a CUDA GPU with full TensorRT: engines built for this GPU run the sampler's passes within bf16 tolerance of
the torch model (tests/gpu: marked gpu by folder, skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dgemma.core.profiles import for_device
from dgemma.engines.build import build_engines
from dgemma.model.checkpoint import load_checkpoint
from dgemma.runtime.torch_backend import TorchBackend
from dgemma.runtime.trt_backend import TrtBackend


@pytest.mark.gpu
def test_engines_run_the_sampler_on_gpu(onnx_root, tiny_dir, tmp_path):
    """On a GPU with TensorRT: build for this GPU and check logits against the torch model (bf16 tolerance)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("full `tensorrt` is not importable on this GPU machine (NGC container needed)")
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
