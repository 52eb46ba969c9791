"""Writing the quantized checkpoint in our real layout, unified-HF style (the reader is dgemma.model.quantized).

Writes config.json (+ quantization_config), generation_config.json, tokenizer.json, hf_quant_config.json and
model.safetensors: every quantized weight as float8_e4m3fn (fp8) or packed uint8 e2m1 pairs (nvfp4, low nibble
first) next to `weight_scale` (fp8: fp32 per tensor / per expert; nvfp4: e4m3 per 16-block), `weight_scale_2`
(nvfp4: fp32 global, per expert for experts) and `input_scale` (fp32, shared by all experts of a projection).
NVFP4 block scales come from the weight's block maxima (dynamic quantizers: max recipes) or from the calibrated
per-block amax (static quantizers: the MSE / local-Hessian recipes); either way the stored weights dequantize to
ModelOpt's fake-quant weights bit for bit. Weight-only recipes still write input_scale (calibrated, not applied).
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


def _nvfp4(w: Tensor, amax: Tensor, global_amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> packed uint8 [..., K/2], e4m3 block scales [..., K/16], fp32 global scale (ModelOpt NVFP4QTensor).

    Dynamic weight quantizer (amax per tensor): block scales from the weight's block maxima. Static one
    (global_amax given, amax per 16-block, e.g. from the MSE scale sweep): block scales from the calibrated
    block amax, e4m3-rounded as ModelOpt's static fake quant does; a block whose scale rounds to 0 is zero."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    if global_amax is None:
        s2 = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
        qt, scale, s2 = NVFP4QTensor.quantize(w.float(), NVFP4_BLOCK, weights_scaling_factor_2=s2)
        return qt._quantized_data, scale, s2.reshape(())
    g = global_amax.float().reshape(())
    # ModelOpt's static fake quant rounds amax / 6 to e4m3 with fp8_eager(., g / 6): code = (amax / 6) * m, m =
    # 448 / (g / 6), block scale = code * (1 / m). Storing s2 = 1 / m (within an ulp of g / (6 * 448)) makes the
    # checkpoint's code * s2 that block scale exactly, so the stored weights are the fake-quant weights bit for bit.
    m = E4M3_MAX / (g / E2M1_MAX)
    s2 = 1 / m
    blocks = (*w.shape[:-1], w.shape[-1] // NVFP4_BLOCK)
    code = ((amax.float().reshape(blocks) / E2M1_MAX) * m).clamp(-E4M3_MAX, E4M3_MAX)
    code = code.to(torch.float8_e4m3fn)
    zero = code.float() == 0
    wz = torch.where(zero.repeat_interleave(NVFP4_BLOCK, -1), 0.0, w.float())
    scale = torch.where(zero, 1.0, code.float()).to(torch.float8_e4m3fn)
    qt, scale, _ = NVFP4QTensor.quantize(wz, NVFP4_BLOCK, weights_scaling_factor=scale, weights_scaling_factor_2=s2)
    return qt._quantized_data, scale, s2


def _weight(precision: str, w: Tensor, quantizer) -> dict[str, Tensor]:
    if precision == "fp8":
        q, s = fp8_quantize(w, quantizer.amax)
        return {"": q, "_scale": s}
    static = quantizer.amax.numel() > 1 and getattr(quantizer, "global_amax", None) is not None
    q, s, s2 = _nvfp4(w, quantizer.amax, quantizer.global_amax if static else None)
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
            for suffix, t in _weight(precision, mod.weight.detach(), mod.weight_quantizer).items():
                out[f"{base}.weight{suffix}"] = t
            out[f"{base}.input_scale"] = _input_scale(precision, mod.input_quantizer)
        elif hasattr(mod, "gate_up_proj_weight_quantizers"):
            for proj in ("gate_up_proj", "down_proj"):
                w, qs = getattr(mod, proj).detach(), getattr(mod, f"{proj}_weight_quantizers")
                per = [_weight(precision, w[e], q) for e, q in enumerate(qs)]
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
