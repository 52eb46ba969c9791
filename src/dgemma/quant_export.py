"""Quantized checkpoint in our real layout, unified-HF style, and the loader that dequantizes it.

Writes config.json (+ quantization_config), generation_config.json, tokenizer.json, hf_quant_config.json and
model.safetensors: every quantized weight as float8_e4m3fn (fp8) or packed uint8 e2m1 pairs (nvfp4, low nibble
first) next to `weight_scale` (fp8: fp32 per tensor / per expert; nvfp4: e4m3 per 16-block), `weight_scale_2`
(nvfp4: fp32 global, per expert for experts) and `input_scale` (fp32, shared by all experts of a projection).
Excluded modules keep the checkpoint dtype. Knows nothing of calibration or quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import DECODER, ENCODER_SCALAR, SINGLE, expected_tensors, load_config, state_dict_for_checkpoint
from .errors import ArtifactError
from .model import DiffusionGemma, torch_dtype

E4M3_MAX, E2M1_MAX, GROUP = 448.0, 6.0, 16
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")  # (router.per_expert_scale is a weight)


def _fp8(w: Tensor, amax: Tensor) -> tuple[Tensor, Tensor]:
    """ModelOpt's scaled_e4m3 order: w * (448 / amax) -> e4m3; scale = amax / 448 (fp32)."""
    amax = amax.float().reshape(-1)
    shape = (-1,) + (1,) * (w.dim() - 1) if amax.numel() > 1 else ()
    q = (w.float() * (E4M3_MAX / amax).reshape(shape)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, (amax / E4M3_MAX).reshape(-1 if amax.numel() > 1 else ())


def _nvfp4(w: Tensor, amax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> packed uint8 [..., K/2], e4m3 block scales [..., K/16], fp32 global scale (ModelOpt NVFP4QTensor)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    s2 = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
    qt, scale, s2 = NVFP4QTensor.quantize(w.float(), GROUP, weights_scaling_factor_2=s2)
    return qt._quantized_data, scale, s2.reshape(())


def _weight(precision: str, w: Tensor, amax: Tensor) -> dict[str, Tensor]:
    if precision == "fp8":
        q, s = _fp8(w, amax)
        return {"": q, "_scale": s}
    q, s, s2 = _nvfp4(w, amax)
    return {"": q, "_scale": s, "_scale_2": s2}


def _input_scale(precision: str, quantizer) -> Tensor:
    return (quantizer.amax.float() / (E4M3_MAX * (1.0 if precision == "fp8" else E2M1_MAX))).reshape(())


def quantized_tensors(model, precision: str) -> dict[str, Tensor]:
    """Checkpoint name -> tensor, quantized where a weight quantizer is enabled."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    keep = expected_tensors(model.cfg)  # drops quantizer buffers and ModelOpt's _shared_quant_states
    out = {k: v for k, v in state_dict_for_checkpoint(model).items() if k in keep}
    for name, mod in model.named_modules():
        base = DECODER + name
        wq = getattr(mod, "weight_quantizer", None)  # QuantLinear (a dynamic class; no isinstance)
        if isinstance(wq, TensorQuantizer) and wq.is_enabled:
            for suffix, t in _weight(precision, mod.weight.detach(), mod.weight_quantizer.amax).items():
                out[f"{base}.weight{suffix}"] = t
            out[f"{base}.input_scale"] = _input_scale(precision, mod.input_quantizer)
        elif hasattr(mod, "gate_up_proj_weight_quantizers"):
            for proj in ("gate_up_proj", "down_proj"):
                w, qs = getattr(mod, proj).detach(), getattr(mod, f"{proj}_weight_quantizers")
                per = [_weight(precision, w[e], q.amax) for e, q in enumerate(qs)]
                for suffix in per[0]:
                    out[f"{base}.{proj}{suffix and '_weight' + suffix}"] = torch.stack([p[suffix] for p in per])
                out[f"{base}.{proj}_input_scale"] = _input_scale(precision, getattr(mod, f"{proj}_input_quantizer"))
    return out


def hf_quant_config(precision: str, exclude_modules: list[str], modelopt_version: str) -> dict:
    q = {"quant_algo": QUANT_ALGO[precision], "kv_cache_quant_algo": None, "exclude_modules": exclude_modules}
    if precision == "nvfp4":
        q["group_size"] = GROUP
    return {"producer": {"name": "modelopt", "version": modelopt_version}, "quantization": q}


def write_quantized_checkpoint(model, precision: str, out: Path, ck, ck_path: Path, exclude_modules: list[str],
                               modelopt_version: str) -> None:
    """Into the existing directory `out` (the caller's temp dir; it renames atomically)."""
    from safetensors.torch import save_file

    hq = hf_quant_config(precision, exclude_modules, modelopt_version)
    cfg = ck.config.to_hf_dict()
    cfg["quantization_config"] = dict(hq["quantization"], quant_method="modelopt")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ck.sampler.to_generation_config(), indent=2) + "\n")
    (out / "hf_quant_config.json").write_text(json.dumps(hq, indent=2) + "\n")
    if (ck_path / "tokenizer.json").exists():
        shutil.copy(ck_path / "tokenizer.json", out / "tokenizer.json")
    tensors = {k: v.contiguous() for k, v in quantized_tensors(model, precision).items()}
    save_file(tensors, str(out / SINGLE), metadata={"format": "pt", "quant_algo": QUANT_ALGO[precision]})


def _dequant(precision: str, q: Tensor, scale: Tensor, scale_2: Tensor | None, dtype) -> Tensor:
    if precision == "fp8":
        return (q.float() * scale.reshape((-1,) + (1,) * (q.dim() - 1) if scale.dim() else ())).to(dtype)
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    shape = (*q.shape[:-1], q.shape[-1] * 2)
    if scale_2.dim():  # experts: one global scale per expert
        return torch.stack([_dequant(precision, q[e], scale[e], scale_2[e], dtype) for e in range(q.shape[0])])
    return NVFP4QTensor(torch.Size(shape), dtype, q).dequantize(dtype, scale=scale, double_scale=scale_2,
                                                               block_sizes={-1: GROUP})


def load_quantized(path: str | Path) -> DiffusionGemma:
    """quantize/<precision>/ -> native model with the weights dequantized (weight-only; no activation quant)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "hf_quant_config.json").exists():
        raise ArtifactError(f"{path} has no hf_quant_config.json. Write it with: make quantize PRECISION=fp8")
    algo = json.loads((path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    precision = {v: k for k, v in QUANT_ALGO.items()}[algo]
    cfg, _ = load_config(path)
    dtype = torch_dtype(cfg.dtype)
    t = load_file(str(path / SINGLE))
    deq = {}
    for name, v in t.items():
        if name.endswith(SCALE_SUFFIXES):
            continue
        sc = name + "_scale" if name.endswith(".weight") else name + "_weight_scale"
        if sc in t:
            v = _dequant(precision, v, t[sc], t.get(sc + "_2"), dtype)
        deq[name] = v
    model = DiffusionGemma.random(cfg, dtype=dtype)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            model.encoder_layer_scalars[i] = deq.pop(ENCODER_SCALAR.format(i)).reshape(())
        for name, v in deq.items():
            params[name[len(DECODER):]].copy_(v)
    return model.eval()
