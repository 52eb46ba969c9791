"""Quantized ONNX graphs (fp8, nvfp4) from a `dgemma quantize` output (quantize/<precision>/).

Owns the *export model* (the native DiffusionGemma whose quantized nn.Linear / Experts modules are swapped for
.qdq_ops' `QLinear` / `QExperts`, holding the stored FP8 / NVFP4 tensors as buffers), the manifest fields (with
the quantize directory's fingerprint, so later stages refuse graphs whose quantize input changed: core.manifest)
and ModelOpt's fake-quant model as the reference. .onnx drives the export (dims, manifest, atomic output).

What is quantized is what the checkpoint says: a module is swapped iff quantize wrote scales for it, and quantize
decides that through dgemma.quantize.recipe.EXCLUDED (router, embedding / LM head, norms, self-conditioning stay
unquantized).

Graph forms (opset 23; verified: ORT 1.31 CPU, TensorRT-RTX 1.7 AOT, strongly typed):
  fp8   float32 graph. Weights FLOAT8E4M3FN initializers -> DequantizeLinear (per tensor; per expert, axis 0, for the
        3-D expert weights); every quantized matmul input QuantizeLinear -> DequantizeLinear with the calibrated
        input_scale. All ai.onnx: ONNX Runtime runs it (session.disable_quant_qdq=1, see ORT_SESSION_CONFIG) and
        TensorRT-RTX builds it for SM89 and SM120.
  nvfp4 bfloat16 graph (the checkpoint dtype; fp16 is the classic overflow risk for Gemma activations). Weights
        FLOAT4E2M1 [.., K] + FLOAT8E4M3FN block scales [.., K/16] (+ fp32 global scale, per expert for experts)
        through two DequantizeLinear (block scales -> bf16, then block_size 16 on axis -1); activations
        trt::TRT_FP4DynamicQuantize (block 16, fp32 global scale = input_scale) + the same two DQ. TensorRT-RTX
        builds it for SM120/121 only; ONNX Runtime has no FP4 kernels and no trt domain, so OrtBackend refuses it.
Attention stays MatMul/Softmax as in the plain graphs (opset 23's Attention op does not build in TensorRT-RTX).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core import contract
from ..core.errors import ArtifactError
from ..core.layout import current
from ..core.manifest import QUANTIZED, quantize_fingerprint, read_quantize_dir
from ..model.checkpoint import DECODER, ENCODER_SCALAR, SINGLE, load_config
from ..model.modeling import DiffusionGemma, Experts, torch_dtype
from ..model.quantized import SCALE_SUFFIXES
from ..runtime.ort_backend import ORT_SESSION_CONFIG
from .onnx import export_onnx
from .qdq_ops import OPSET, QExperts, QLinear, translation_table

__all__ = ["QUANTIZED", "QuantizedExport", "describe", "export_quantized", "load_export_model"]
# modules whose weight is read raw (not through forward), so they cannot hold a quantized weight
_RAW_WEIGHT = ("router.proj",)


def _fix(precision: str) -> str:
    return f"make quantize PRECISION={precision}"


# -- export model --------------------------------------------------------------------------------------------------
def _as_stored(precision: str, name: str, t: Tensor) -> Tensor:
    """Checkpoint weight tensor -> the dtype the graph stores: fp8 as is, packed e2m1 pairs as float4_e2m1fn_x2."""
    want = torch.uint8 if precision == "nvfp4" else torch.float8_e4m3fn
    if t.dtype != want:
        raise ArtifactError(f"{name} is stored as {t.dtype}; a {precision} checkpoint stores {want} (nvfp4: packed "
                            f"e2m1 pairs). Rebuild with: {_fix(precision)}")
    return t.view(torch.float4_e2m1fn_x2) if precision == "nvfp4" else t


def load_export_model(quant_dir: str | Path, precision: str):
    """quantize/<precision>/ -> DiffusionGemma in the graph dtype with every quantized module swapped for QLinear /
    QExperts. Raises ArtifactError if a checkpoint tensor is missing or left over."""
    from safetensors.torch import load_file

    quant_dir = Path(quant_dir)
    cfg, _ = load_config(quant_dir)
    dtype = torch_dtype(contract.kv_dtype(precision))
    t = load_file(str(quant_dir / SINGLE))
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in t:
            raise ArtifactError(f"{quant_dir / SINGLE}: tensor {name} missing. Rebuild with: {_fix(precision)}")
        used.add(name)
        return t[name]

    model = DiffusionGemma.random(cfg, dtype=dtype)  # shapes only: every tensor is overwritten below
    quantized = []
    for name, mod in list(model.named_modules()):
        base = DECODER + name
        if isinstance(mod, nn.Linear) and f"{base}.weight_scale" in t:
            if name.endswith(_RAW_WEIGHT):
                raise ArtifactError(f"{quant_dir}: {name} is quantized, but Ops.route reads its weight raw; it must "
                                    "stay excluded (dgemma.quantize.recipe.EXCLUDED). Rebuild with: " + _fix(precision))
            new = QLinear(precision, _as_stored(precision, f"{base}.weight", take(f"{base}.weight")),
                          take(f"{base}.weight_scale"),
                          take(f"{base}.input_scale"),
                          take(f"{base}.weight_scale_2") if precision == "nvfp4" else None)
        elif isinstance(mod, Experts) and f"{base}.gate_up_proj_weight_scale" in t:
            names = {}
            for proj in ("gate_up_proj", "down_proj"):
                names[proj] = _as_stored(precision, f"{base}.{proj}", take(f"{base}.{proj}"))
                for suffix in ("weight_scale", "input_scale") + (("weight_scale_2",) if precision == "nvfp4" else ()):
                    names[f"{proj}_{suffix}"] = take(f"{base}.{proj}_{suffix}")
            new = QExperts(precision, mod.num_experts, mod.inter, names)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        quantized.append(name)
    if not quantized:
        raise ArtifactError(f"{quant_dir / SINGLE} holds no quantized weights. Rebuild with: {_fix(precision)}")

    params = dict(model.named_parameters()) | {k: v for k, v in model.named_buffers() if not k.startswith("inv_freq")}
    filled = set()
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            model.encoder_layer_scalars[i] = take(ENCODER_SCALAR.format(i)).reshape(()).to(dtype)
        filled.add("encoder_layer_scalars")
        for name, v in t.items():
            if name in used or name.endswith(SCALE_SUFFIXES):
                continue
            ours = name[len(DECODER):] if name.startswith(DECODER) else None
            if ours not in params or params[ours].shape != v.shape:
                raise ArtifactError(f"{quant_dir / SINGLE}: unexpected tensor {name} {tuple(v.shape)}. Rebuild "
                                    f"with: {_fix(precision)}")
            params[ours].copy_(v.to(dtype))
            filled.add(ours)
    q_buffers = {k for k in params if k.rpartition(".")[0] in quantized}
    missing = sorted(set(params) - filled - q_buffers)
    if missing:
        raise ArtifactError(f"{quant_dir / SINGLE}: no tensor for {', '.join(missing[:3])}. Rebuild with: "
                            f"{_fix(precision)}")
    model.quantized_modules = quantized
    return model.eval()


# -- the export ----------------------------------------------------------------------------------------------------
@dataclass
class QuantizedExport:
    """What export.export_onnx needs for a quantized model: the opset, the op translations, manifest fields."""

    precision: str
    opset: int = OPSET
    translations: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def describe(precision: str) -> dict:
    """The graph form, recorded in the ONNX manifest."""
    if precision == "fp8":
        return {"weights": "FLOAT8E4M3FN initializers -> DequantizeLinear (per tensor; experts per expert, axis 0)",
                "activations": "QuantizeLinear -> DequantizeLinear (FLOAT8E4M3FN, calibrated input_scale)",
                "domains": ["ai.onnx"], "onnxruntime": True, "ort_session_config": ORT_SESSION_CONFIG,
                "tensorrt_rtx_sm": [89, 120]}
    return {"weights": "FLOAT4E2M1 [.., K] + FLOAT8E4M3FN block scales [.., K/16] + fp32 global scale -> 2 x "
                       "DequantizeLinear (block_size 16)",
            "activations": "trt::TRT_FP4DynamicQuantize (block 16, fp32 global scale = input_scale) -> 2 x "
                           "DequantizeLinear",
            "domains": ["ai.onnx", "trt"], "onnxruntime": False, "tensorrt_rtx_sm": [120, 121]}


def export_quantized(precision: str, quant_dir: str | Path | None = None, out_root: str | Path | None = None,
                     checkpoint: str | Path | None = None) -> Path:
    """build/onnx/<precision>/ from quantize/<precision>/ (or `quant_dir`); returns the output directory."""
    quant_dir = Path(quant_dir) if quant_dir else current().quantize(precision)
    qm = read_quantize_dir(quant_dir, precision, checkpoint)
    model = load_export_model(quant_dir, precision)
    src = Path(qm["input_checkpoint"])
    spec = QuantizedExport(precision, translations=translation_table(precision), manifest={
        "quantize": {"dir": str(quant_dir.resolve()), "fingerprint": quantize_fingerprint(quant_dir),
                     "input_checkpoint": qm["input_checkpoint"],
                     "input_checkpoint_sha256": qm.get("input_checkpoint_sha256"),
                     "calib_sha256": qm.get("calib_sha256"), "modelopt": qm.get("versions", {}).get("modelopt"),
                     "excluded": qm.get("excluded")},
        "quantization": describe(precision) | {"graph_dtype": contract.kv_dtype(precision),
                                               "quantized_modules": model.quantized_modules},
    })
    # the graphs are served next to the original checkpoint (tokenizer, sampler): record it, as a plain export does
    ck = src if (src / "config.json").is_file() else None
    return export_onnx(model, precision, out_root, checkpoint=ck, exporter="dynamo", quantized=spec)
