"""Shared fixtures: tiny DiffusionGemma checkpoints (ours and transformers'), marks by folder, GPU skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU tensors (dgemma.kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SPEC_TINY_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
    num_experts=4, top_k_experts=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=4096, use_bidirectional_attention="vision", pad_token_id=0, eos_token_id=1,
    bos_token_id=2,
)
# a second shape: 3 layers (S,S,F), window 8, 8 experts top-3, GQA 4:1 on full layers, canvas 16
WIDE_TINY_TEXT = dict(
    SPEC_TINY_TEXT, hidden_size=48, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, global_head_dim=32, num_global_key_value_heads=1,
    num_experts=8, top_k_experts=3, sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
)
HF_CONFIGS = {"spec": (SPEC_TINY_TEXT, 32), "wide": (WIDE_TINY_TEXT, 16)}


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible)"))


def make_hf_model(name: str = "spec", seed: int = 0, dtype=torch.float32):
    """transformers' DiffusionGemmaForBlockDiffusion with perturbed norms and distinct encoder/decoder scalars."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text, canvas = HF_CONFIGS[name]
    vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=dict(text), vision_config=vision, canvas_length=canvas,
                               image_token_id=511, boi_token_id=509, eoi_token_id=510)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "scale" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for i, layer in enumerate(model.model.decoder.layers):
            layer.layer_scalar.fill_(0.9 + 0.05 * i)
        for i, layer in enumerate(model.model.encoder.language_model.layers):
            layer.layer_scalar.fill_(1.1 - 0.05 * i)
    return model.to(dtype)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{name: (hf_model, checkpoint_dir)} for the tiny configs, saved with save_pretrained (the real layout)."""
    out = {}
    for name in HF_CONFIGS:
        model = make_hf_model(name)
        d = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(d)
        out[name] = (model, d)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from dgemma.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "ck")


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def onnx_root(tiny_dir, tmp_path_factory):
    from dgemma.cli import main

    out = tmp_path_factory.mktemp("onnx")
    assert main(["onnx", "--precision", "fp32", "--checkpoint", str(tiny_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def onnx_dir(onnx_root):
    return onnx_root / "fp32"


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from dgemma.model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_dir).model


@pytest.fixture
def onnx_copy(onnx_dir, tmp_path):
    """A writable copy of the session's fp32 graphs (tests that corrupt or re-stamp them)."""
    import shutil

    dst = tmp_path / "onnx" / "fp32"
    shutil.copytree(onnx_dir, dst)
    return dst
