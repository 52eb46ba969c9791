"""A `dgemma quantize --precision nvfp4` directory for a checkpoint, written with model.lowp's NVFP4 encoder instead of
ModelOpt's calibration (seconds instead of minutes): the same layout and the same quantised set (every attention and
dense-MLP projection and the experts; router, embedding, norms and self-conditioning excluded, quantize.recipe)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from dgemma.model.checkpoint import DECODER, SINGLE, load_checkpoint, state_dict_for_checkpoint
from dgemma.model.lowp import E2M1_MAX, E4M3_MAX, nvfp4_encode
from dgemma.model.modeling import Experts
from dgemma.quantize.recipe import EXCLUDE_MODULES
from dgemma.quantize.writer import hf_quant_config


def write_nvfp4_checkpoint(src: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    ck = load_checkpoint(src)
    model = ck.model
    t = dict(state_dict_for_checkpoint(model))
    for name, mod in model.named_modules():
        base = DECODER + name
        if isinstance(mod, nn.Linear) and name.startswith("layers.") and not name.endswith("router.proj"):
            w = mod.weight.detach()
            s2 = (w.float().abs().amax() / (E2M1_MAX * E4M3_MAX)).reshape(())
            t[base + ".weight"], t[base + ".weight_scale"] = nvfp4_encode(w, s2)
            t[base + ".weight_scale_2"], t[base + ".input_scale"] = s2, torch.tensor(0.01)
        elif isinstance(mod, Experts):
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(mod, proj).detach()
                s2 = w.float().abs().amax(dim=(1, 2)) / (E2M1_MAX * E4M3_MAX)
                t[f"{base}.{proj}"], t[f"{base}.{proj}_weight_scale"] = nvfp4_encode(w, s2)
                t[f"{base}.{proj}_weight_scale_2"], t[f"{base}.{proj}_input_scale"] = s2, torch.tensor(0.01)
    out.mkdir(parents=True)
    hq = hf_quant_config("nvfp4", EXCLUDE_MODULES, "lowp-test")
    cfg = ck.config.to_hf_dict()
    cfg["quantization_config"] = dict(hq["quantization"], quant_method="modelopt")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(ck.sampler.to_generation_config(), indent=2))
    (out / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
    shutil.copy(Path(src) / "tokenizer.json", out / "tokenizer.json")
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / SINGLE))
    return out
