"""Reading a quantized checkpoint (the `dgemma quantize` output, ModelOpt's unified-HF layout) into a native model.

Layout (written by dgemma.quantize.writer): config.json with quantization_config, hf_quant_config.json and
model.safetensors, where every quantized weight is float8_e4m3fn (fp8) or packed uint8 e2m1 pairs (nvfp4, low
nibble first) next to `weight_scale` (fp8: fp32 per tensor / per expert; nvfp4: e4m3 per 16-block),
`weight_scale_2` (nvfp4: fp32 global, per expert for experts) and `input_scale` (fp32, shared by all experts of a
projection). Excluded modules keep the checkpoint dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..core.errors import ArtifactError
from ..core.manifest import QUANT_ALGO
from .checkpoint import DECODER, ENCODER_SCALAR, SINGLE, load_config
from .lowp import nvfp4_decode, per_axis0
from .modeling import DiffusionGemma, torch_dtype

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")  # (router.per_expert_scale is a weight)


def quantized_precision(path: str | Path) -> str:
    """fp8 | nvfp4, from hf_quant_config.json."""
    path = Path(path)
    if not (path / "hf_quant_config.json").exists():
        raise ArtifactError(f"{path} has no hf_quant_config.json: not a quantized checkpoint. Write one with: "
                            "make quantize PRECISION=fp8")
    algo = json.loads((path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    return {v: k for k, v in QUANT_ALGO.items()}[algo]


def dequantize(precision: str, q: Tensor, scale: Tensor, scale_2: Tensor | None, dtype) -> Tensor:
    """One stored weight back to `dtype` (fp8: times its per-tensor / per-expert scale; nvfp4: the NVFP4 decoder)."""
    if precision == "fp8":
        return (q.float() * per_axis0(scale.float(), q.dim())).to(dtype)
    return nvfp4_decode(q, scale, scale_2, dtype)


def load_quantized(path: str | Path) -> DiffusionGemma:
    """quantize/<precision>/ -> native model with the weights dequantized (weight-only; no activation quant)."""
    from safetensors.torch import load_file

    path = Path(path)
    precision = quantized_precision(path)
    cfg, _ = load_config(path)
    dtype = torch_dtype(cfg.dtype)
    t = load_file(str(path / SINGLE))
    deq = {}
    for name, v in t.items():
        if name.endswith(SCALE_SUFFIXES):
            continue
        sc = name + "_scale" if name.endswith(".weight") else name + "_weight_scale"
        if sc in t:
            v = dequantize(precision, v, t[sc], t.get(sc + "_2"), dtype)
        deq[name] = v
    model = DiffusionGemma.random(cfg, dtype=dtype)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            model.encoder_layer_scalars[i] = deq.pop(ENCODER_SCALAR.format(i)).reshape(())
        for name, v in deq.items():
            params[name[len(DECODER):]].copy_(v)
    return model.eval()
