"""4-bit expert weights for the fast backend (docs/kernels.md item 6, "W4A16"): `Nvfp4Experts` holds the routed
experts in ModelOpt's NVFP4 layout and runs kernels.moe_w4a16 (bf16 activations, e2m1 -> bf16 in registers) or, as
its torch path, the same arithmetic with model.lowp.nvfp4_decode; `load_nvfp4` reads the `dgemma quantize
--precision nvfp4` checkpoint into a servable model; `quantize_nvfp4_` converts a model in place (synthetic weights,
tests); `footprint` measures a model's weight bytes by category.

Dense projections (attention q/k/v/o, dense MLP, self-conditioning): FP8 per output channel (Fp8Linear) from the
decoded NVFP4 values. They are ~1.66 B parameters at full size: FP8 reads 1.66 GB per step and keeps the fused
dense pass (its GEMMs are FP8), NVFP4 decoded to bf16 would read 3.3 GB and fall back to the torch layer pass, and
would put the weights at ~17.7 GB instead of ~16 (core.profiles.weight_footprint). The price is one e4m3 rounding
per weight on top of NVFP4's own (about 2^-5 rms relative against NVFP4's 2^-3 step), measured in the tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ...core.errors import ArtifactError
from ...model.checkpoint import DECODER, ENCODER_SCALAR, SINGLE, load_config
from ...model.lowp import E2M1_MAX, E4M3_MAX, nvfp4_decode, nvfp4_encode
from ...model.modeling import DiffusionGemma, Experts, grouped_experts, rope_inv_freq, torch_dtype
from ...model.quantized import quantized_precision
from .fp8 import Fp8Experts, Fp8Linear, quantize_fp8_
from .policy import OFF, Kernels, k_w4a16

log = logging.getLogger("dgemma.fast")
_PROJ = ("gate_up_proj", "down_proj")


class Nvfp4Experts(nn.Module):
    """Routed experts with NVFP4 weights: per projection the packed e2m1 pairs uint8 [E, N, K/2] (`<proj>`), e4m3
    block scales [E, N, K/16] (`<proj>_weight_scale`) and an fp32 global scale per expert [E]
    (`<proj>_weight_scale_2`), the checkpoint's names. Same routing math as model.Experts; activations stay bf16."""

    kernels: Kernels = OFF  # FastBackend hands its policy to the modules it runs

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for proj in _PROJ:
            for suffix in ("", "_weight_scale", "_weight_scale_2"):
                self.register_buffer(proj + suffix, tensors[proj + suffix].contiguous())
        self.num_experts = self.gate_up_proj.shape[0]
        self.inter = self.gate_up_proj.shape[1] // 2

    @classmethod
    def from_experts(cls, ex: nn.Module) -> "Nvfp4Experts":
        """Quantise a model.Experts: per expert and projection, global scale amax / (6 * 448) (ModelOpt's)."""
        t = {}
        for proj in _PROJ:
            w = getattr(ex, proj).detach()
            s2 = w.float().abs().amax(dim=(1, 2)) / (E2M1_MAX * E4M3_MAX)
            t[proj], t[proj + "_weight_scale"] = nvfp4_encode(w, s2)
            t[proj + "_weight_scale_2"] = s2
        return cls(t)

    def dequant(self, proj: str, dtype: torch.dtype) -> Tensor:
        return nvfp4_decode(getattr(self, proj), getattr(self, proj + "_weight_scale"),
                            getattr(self, proj + "_weight_scale_2"), dtype)

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        return self.kernels.run("moe", lambda: k_w4a16.w4a16_moe(
            x, weights, idx, self.gate_up_proj, self.gate_up_proj_weight_scale, self.gate_up_proj_weight_scale_2,
            self.down_proj, self.down_proj_weight_scale, self.down_proj_weight_scale_2),
            lambda: self.forward_torch(x, weights, idx))

    def forward_torch(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        """Decoded to the activation dtype each call (the NVFP4 decoder), then model.Experts' grouped path: a slow
        fallback for a GPU without the kernels, and the CPU reference."""
        return grouped_experts(x, weights, idx.long(), self.dequant("gate_up_proj", x.dtype),
                               self.dequant("down_proj", x.dtype))


@torch.no_grad()
def quantize_nvfp4_(model: DiffusionGemma) -> DiffusionGemma:
    """In place: experts -> Nvfp4Experts (quantised here, ModelOpt's per-expert global scales), every other layer /
    self-conditioning linear -> Fp8Linear (quantize_fp8_). Synthetic full-size runs and tests."""
    for layer in model.layers:
        if isinstance(layer.experts, Experts):
            layer.experts = Nvfp4Experts.from_experts(layer.experts)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
    return quantize_fp8_(model)


def _tensors(path: Path, device) -> dict[str, Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path / SINGLE), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k).to(device)
    return out


@torch.no_grad()
def load_nvfp4(path: str | Path, device="cpu") -> DiffusionGemma:
    """quantize/nvfp4/ (model.quantized's layout) -> a DiffusionGemma whose experts are Nvfp4Experts (the stored
    packed weights and scales, unchanged) and whose dense projections are Fp8Linear (decoded, then e4m3 per row);
    the embedding, norms, router and scalars in the checkpoint dtype. No bf16 copy of the experts is ever made."""
    path = Path(path)
    if quantized_precision(path) != "nvfp4":
        raise ArtifactError(f"{path} holds a {quantized_precision(path)} checkpoint, not nvfp4. Write one with: make "
                            "quantize PRECISION=nvfp4")
    cfg, _ = load_config(path)
    dtype = torch_dtype(cfg.dtype)
    t = _tensors(path, device)
    with torch.device("meta"):
        model = DiffusionGemma(cfg).to(dtype)
    real: dict[str, nn.Module] = {}
    for i in range(cfg.num_hidden_layers):
        base = f"{DECODER}layers.{i}.experts."
        mine = {k[len(base):]: t.pop(k) for k in list(t) if k.startswith(base)}
        real[f"layers.{i}.experts"] = Nvfp4Experts({k: v for k, v in mine.items() if not k.endswith("input_scale")})
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.endswith("router.proj"):
            continue
        w = t.pop(f"{DECODER}{name}.weight")
        if f"{DECODER}{name}.weight_scale" in t:  # NVFP4 in the checkpoint; excluded modules keep their dtype
            w = nvfp4_decode(w, t.pop(f"{DECODER}{name}.weight_scale"), t.pop(f"{DECODER}{name}.weight_scale_2"),
                             dtype)
            t.pop(f"{DECODER}{name}.input_scale", None)  # W4A16: activations are never quantised
        real[name] = Fp8Linear(w)
    for name in real:  # placeholders while the rest of the meta model is materialised
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    model.to_empty(device=device)
    for name, mod in real.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, mod)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for i in range(cfg.num_hidden_layers):
        model.encoder_layer_scalars[i] = t.pop(ENCODER_SCALAR.format(i)).reshape(())
    for name, v in t.items():
        params[name[len(DECODER):]].copy_(v)
    for sliding, name in ((True, "inv_freq_sliding"), (False, "inv_freq_full")):  # meta-built: compute them here
        model.register_buffer(name, rope_inv_freq(cfg, sliding).to(device), persistent=False)
    return model.eval()


def footprint(model: DiffusionGemma) -> dict[str, int]:
    """Weight bytes of a model by category: experts, dense (attention, dense MLP, self-conditioning projections),
    embedding (the tied embedding / LM head, plus FP8 head copies), other (router, norms, scalars)."""
    out = dict.fromkeys(("experts", "dense", "embedding", "other"), 0)

    def nbytes(mod: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers(recurse=True))
                   if not isinstance(t, torch.nn.UninitializedBuffer))

    seen = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (Experts, Fp8Experts, Nvfp4Experts)):
            out["experts"] += nbytes(mod)
        elif isinstance(mod, (Fp8Linear, nn.Linear)) and not name.endswith("router.proj"):
            out["embedding" if name in ("fp8_head", "fp8_soft") else "dense"] += nbytes(mod)
        else:
            continue
        seen.update(id(t) for t in list(mod.parameters()) + list(mod.buffers()))
    out["embedding"] += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    seen.add(id(model.embed_tokens.weight))
    out["other"] = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) +
                       list(model.named_buffers()) if id(t) not in seen and not n.startswith("inv_freq"))
    return out


def describe_footprint(fp: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in fp.items()) + f" = {sum(fp.values()) / 1e9:.3f} GB"


__all__ = ["Nvfp4Experts", "describe_footprint", "footprint", "load_nvfp4", "quantize_nvfp4_"]
