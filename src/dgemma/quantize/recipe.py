"""Quantization stage: ModelOpt recipes (fp8, nvfp4) applied to the native DiffusionGemma, calibration, outputs.

Owns the recipes and THE exclusion list (`EXCLUDED`), the quantized routed experts (`_QuantExperts`), the CPU
NVFP4 kernel and `quantize_model`. The calibration loop lives in .calibrate, the checkpoint layout in .writer,
quality metrics in .quality, the stage (atomic writing of `quantize/<precision>/`) in .stage.

What is quantized (fake-quant during calibration; real low-precision tensors in the exported checkpoint):
  * every nn.Linear of the layers: attention q/k/v/o_proj and the dense MLP gate/up/down_proj
    (ModelOpt QuantLinear: per-tensor weight + input quantizers for fp8, 16-element blocks for nvfp4);
  * the routed experts (3-D gate_up_proj [E,2I,H], down_proj [E,H,I], run through grouped_mm, which ModelOpt
    cannot see): `_QuantExperts` gives each expert its own weight quantizer and each projection one input
    quantizer shared by all experts, the layout of ModelOpt's own fused-experts wrapper and of its HF export.
What is NOT quantized (see EXCLUDED): the router (router.proj, routing decisions), the tied embedding / LM head,
every RMSNorm, and the self-conditioning MLP (ModelOpt's DiffusionGemma support excludes `*self_conditioning*`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.manifest import QUANTIZED
from ..model.lowp import nvfp4_fake_quant
from ..model.modeling import OPS, Experts, grouped_mm

PRECISIONS = QUANTIZED

# THE exclusion list: ModelOpt quantizer-name pattern -> why. Embedding / LM head and norms are no nn.Linear
# (the head is F.linear on the tied embedding), so ModelOpt never attaches quantizers to them; they are listed
# so the checkpoint's `exclude_modules` states it.
EXCLUDED = {
    "*router*": "routing decisions; router.proj is read as a raw weight by Ops.route",
    "*self_conditioning*": "ModelOpt's DiffusionGemma support excludes it by default",
    "*embed_tokens*": "tied embedding = LM head (F.linear on the embedding weight)",
    "*norm*": "RMSNorm weights and the router's scale stay in the checkpoint dtype",
}
EXCLUDE_MODULES = ["lm_head", "model.decoder.embed_tokens", "model.decoder.layers.*.router*",
                   "model.decoder.self_conditioning*", "model.decoder.*norm*"]


def _mtq():
    import modelopt.torch.quantization as mtq  # lazy: heavy, and only this stage needs it

    return mtq


def recipe(precision: str) -> dict:
    """ModelOpt config: FP8_DEFAULT_CFG (per-tensor e4m3 weights+activations) or NVFP4_DEFAULT_CFG + EXCLUDED."""
    mtq = _mtq()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} cannot be quantized here; valid: {', '.join(PRECISIONS)}.")
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if precision == "fp8" else mtq.NVFP4_DEFAULT_CFG)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in EXCLUDED]
    return cfg


# -- CPU NVFP4 kernel (toolchain.md §2.1): dgemma.model.lowp.nvfp4_fake_quant, bit-equal to ModelOpt's NVFP4QTensor
_CPU_LIB = None


def install_cpu_nvfp4_kernel() -> None:
    """Register the CPU kernel for torch.library op tensorrt::dynamic_block_quantize_op (idempotent).

    A registered kernel (not a patched Python global) keeps the op in traced graphs for ONNX export."""
    global _CPU_LIB
    if _CPU_LIB is not None:
        return
    import modelopt.torch.quantization.tensor_quant as tq

    orig = tq._dynamic_block_quantize_impl

    def impl(x, block, amax, nb, eb, snb, seb):
        if not x.is_cuda and amax is not None and (nb, eb, snb, seb) == (4, 2, 8, 4):
            return nvfp4_fake_quant(x, block, amax)
        return orig(x, block, amax, nb, eb, snb, seb)

    lib = torch.library.Library("tensorrt", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib.impl("dynamic_block_quantize_op", impl, "CPU")
    _CPU_LIB = lib  # the registration lives as long as the Library object


# -- routed experts ------------------------------------------------------------------------------------------------
def _quant_experts_cls():
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

    class _QuantExperts(QuantModule):
        """Experts with per-expert weight quantizers and one shared input quantizer per projection (names as in
        ModelOpt's _QuantFusedExperts, so its name matching and export conventions apply). Grouped impl only."""

        def _setup(self):
            n = self.num_experts
            self.gate_up_proj_input_quantizer = TensorQuantizer()
            self.gate_up_proj_weight_quantizers = nn.ModuleList(TensorQuantizer() for _ in range(n))
            self.down_proj_input_quantizer = TensorQuantizer()
            self.down_proj_weight_quantizers = nn.ModuleList(TensorQuantizer() for _ in range(n))

        def iter_weights_for_calibration(self):
            for w, qs in ((self.gate_up_proj, self.gate_up_proj_weight_quantizers),
                          (self.down_proj, self.down_proj_weight_quantizers)):
                for e, q in enumerate(qs):
                    yield w[e], q

        def quantized_weights(self) -> tuple[Tensor, Tensor]:
            """Fake-quantized gate_up_proj, down_proj (each expert through its own quantizer)."""
            gu = torch.stack([q(self.gate_up_proj[e]) for e, q in enumerate(self.gate_up_proj_weight_quantizers)])
            dn = torch.stack([q(self.down_proj[e]) for e, q in enumerate(self.down_proj_weight_quantizers)])
            return gu, dn

        def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
            assert self.impl == "grouped", "quantized experts run the grouped impl (dense is for ONNX export)"
            t, k = idx.shape  # as Experts._grouped, with the quantizers in front of both grouped GEMMs
            expert_ids, perm = torch.sort(idx.reshape(-1))
            xs = self.gate_up_proj_input_quantizer(x[perm // k])
            ws = weights.reshape(-1)[perm]
            hist_in = expert_ids.float() if x.device.type == "cpu" else expert_ids.int()
            counts = torch.histc(hist_in, bins=self.num_experts, min=0, max=self.num_experts - 1)
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gu_w, dn_w = self.quantized_weights()
            gate, up = grouped_mm(xs, gu_w.transpose(-2, -1), offs).chunk(2, dim=-1)
            h = self.down_proj_input_quantizer(OPS.gelu_mul(gate, up))
            y = grouped_mm(h, dn_w.transpose(-2, -1), offs) * ws.unsqueeze(-1)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            return y[inv].view(t, k, -1).sum(dim=1).to(x.dtype)

    return _QuantExperts


def register_experts() -> None:
    """Register _QuantExperts for dgemma.model.Experts before ModelOpt's auto-detection would wrap it in
    _QuantFusedExperts (which intercepts F.linear, never called by grouped_mm: it would calibrate nothing)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    if QuantModuleRegistry.get(Experts) is None:
        QuantModuleRegistry.register({Experts: "dgemma.Experts"})(_quant_experts_cls())


def quantize_model(model, precision: str, loop) -> nn.Module:
    """In place: ModelOpt quantize + max calibration through `loop(model)`. Returns the model."""
    mtq = _mtq()
    install_cpu_nvfp4_kernel()
    register_experts()
    with torch.no_grad():
        return mtq.quantize(model, recipe(precision), loop)


def quantizer_summary(model) -> dict[str, bool]:
    """Quantizer name -> enabled."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.is_enabled for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
