"""Writing the quantized checkpoint in our real layout, unified-HF style (the reader is dgemma.model.quantized).

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

from ..core.manifest import QUANT_ALGO
from ..model.checkpoint import DECODER, SINGLE, expected_tensors, state_dict_for_checkpoint
from ..model.lowp import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK, fp8_quantize


def _nvfp4(w: Tensor, amax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> packed uint8 [..., K/2], e4m3 block scales [..., K/16], fp32 global scale (ModelOpt NVFP4QTensor)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    s2 = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
    qt, scale, s2 = NVFP4QTensor.quantize(w.float(), NVFP4_BLOCK, weights_scaling_factor_2=s2)
    return qt._quantized_data, scale, s2.reshape(())


def _weight(precision: str, w: Tensor, amax: Tensor) -> dict[str, Tensor]:
    if precision == "fp8":
        q, s = fp8_quantize(w, amax)
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
        q["group_size"] = NVFP4_BLOCK
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
