"""Quantization stage: ModelOpt recipes (fp8, nvfp4) applied to the native DiffusionGemma, calibration, outputs.

Owns the recipes and THE exclusion list (`EXCLUDED`), the quantized routed experts (`_QuantExperts`), the CPU
NVFP4 kernels and `quantize_model`. The calibration loop lives in .calibrate, the checkpoint layout in .writer,
quality metrics in .quality, the stage (atomic writing of `quantize/<precision>/`) in .stage.

What is quantized (fake-quant during calibration; real low-precision tensors in the exported checkpoint):
  * every nn.Linear of the layers: attention q/k/v/o_proj and the dense MLP gate/up/down_proj
    (ModelOpt QuantLinear: per-tensor weight + input quantizers for fp8, 16-element blocks for nvfp4);
  * the routed experts (3-D gate_up_proj [E,2I,H], down_proj [E,H,I], run through grouped_mm, which ModelOpt
    cannot see): `_QuantExperts` gives each expert its own weight quantizer and each projection one input
    quantizer shared by all experts, the layout of ModelOpt's own fused-experts wrapper and of its HF export.
What is NOT quantized (see EXCLUDED): the router (router.proj, routing decisions), the tied embedding / LM head,
every RMSNorm, and the self-conditioning MLP (ModelOpt's DiffusionGemma support excludes `*self_conditioning*`).
Recipes (`RECIPES`, `--recipe`): the ModelOpt preset and whether the fake-quant model quantizes activations. Weight-
only recipes (w4a16*) target the W4A16 path (NVFP4 weights dequantized in registers, bf16 activations): their input
quantizers are calibrated, so the checkpoint still carries input_scale for the W4A4 TensorRT-RTX graphs, and then
disabled. Static-block recipes (w4a16-mse, w4a16-lh) run ModelOpt's static NVFP4 fake quant, a Triton kernel, on
CPU through `nvfp4_static_fake_quant_cpu`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.manifest import QUANTIZED
from ..model.lowp import E2M1_MAX, E4M3_MAX, e2m1_fake_quant, nvfp4_fake_quant
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


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe: the ModelOpt preset it starts from and what the fake-quant model applies."""

    name: str
    precision: str
    modelopt_cfg: str  # ModelOpt preset (mtq.<name>): weight format and calibration algorithm
    activations: bool  # False: input quantizers calibrated (the checkpoint's input_scale) but not applied
    summary: str

    def describe(self) -> dict:
        cfg = getattr(_mtq(), self.modelopt_cfg)
        return {"name": self.name, "modelopt_cfg": self.modelopt_cfg, "algorithm": cfg.get("algorithm"),
                "activations_quantized": self.activations, "summary": self.summary}


RECIPES: dict[str, dict[str, Recipe]] = {
    "fp8": {"w8a8": Recipe("w8a8", "fp8", "FP8_DEFAULT_CFG", True,
                           "per-tensor e4m3 weights (per expert for experts) and activations, max calibration")},
    "nvfp4": {
        "w4a4": Recipe("w4a4", "nvfp4", "NVFP4_DEFAULT_CFG", True,
                       "NVFP4 weights and activations (dynamic 16-blocks), max calibration: the arithmetic of "
                       "the W4A4 TensorRT-RTX graphs (which every nvfp4 recipe exports to)"),
        "w4a16": Recipe("w4a16", "nvfp4", "NVFP4_DEFAULT_CFG", False,
                        "NVFP4 weights, max calibration; activations stay in the model dtype (W4A16, the Hopper "
                        "CUDA path); input amax still calibrated so input_scale serves the W4A4 graphs"),
        "w4a16-mse": Recipe("w4a16-mse", "nvfp4", "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", False,
                            "NVFP4 weights with static block scales, each 16-block's e4m3 scale chosen from all "
                            "126 by weight MSE (ModelOpt's FP8 scale sweep); activations as w4a16"),
        "w4a16-lh": Recipe("w4a16-lh", "nvfp4", "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", False,
                           "as w4a16-mse, the error weighted by each linear's calibrated input Hessian (ModelOpt's "
                           "local Hessian; routed experts, which it cannot hook, use plain MSE); activations as "
                           "w4a16"),
    },
}
# Tiny trained model, nvfp4 (W4A16 = the checkpoint's weights dequantized, activations in the model dtype), sort
# accuracy on the 100 held-out prompts / on 1000, KL(bf16 || q) on the calib / heldout prompt sets:
#   bf16 95 % / 96.2 %;  w4a4 fake quant 91 % / 91.7 %, KL 7.0e-3 / 1.2e-3;  w4a16 93 % / 95.8 %, 4.1e-3 / 3.3e-4;
#   w4a16-mse 94 % / 96.1 %, 9.1e-4 / 1.9e-4;  w4a16-lh 96 % / 95.3 %, 5.1e-4 / 2.5e-4  (fp8 w8a8 95 % / 95.6 %).
# w4a16-mse is the default: best at n=1000, lowest heldout KL, fewest NVFP4 steps per canvas, and its weights depend
# on the weights alone (no calibration-set dependence); ModelOpt's NVFP4_AWQ_LITE_CFG (95 %, KL 6.5e-4 / 2.9e-4 as
# W4A16 fake quant) needs a per-channel pre_quant_scale on every linear input, which this layout has no tensor for.
DEFAULT_RECIPE = {"fp8": "w8a8", "nvfp4": "w4a16-mse"}
RECIPE_NAMES = tuple(dict.fromkeys(n for r in RECIPES.values() for n in r))


def get_recipe(precision: str, name: str | None = None) -> Recipe:
    """The Recipe `name` (default: DEFAULT_RECIPE[precision]) of `precision`; ConfigError names the valid ones."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} cannot be quantized here; valid: {', '.join(PRECISIONS)}.")
    name = name or DEFAULT_RECIPE[precision]
    if name not in RECIPES[precision]:
        raise ConfigError(f"recipe {name!r} is not a {precision} recipe; valid for --precision {precision}: "
                          f"{', '.join(RECIPES[precision])}.")
    return RECIPES[precision][name]


def recipe(precision: str, name: str | None = None) -> dict:
    """ModelOpt config of a recipe (FP8_DEFAULT_CFG, NVFP4_DEFAULT_CFG, ...) + EXCLUDED."""
    cfg = copy.deepcopy(getattr(_mtq(), get_recipe(precision, name).modelopt_cfg))
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in EXCLUDED]
    return cfg


# -- CPU NVFP4 kernels (toolchain.md §2.1): dgemma.model.lowp.nvfp4_fake_quant, bit-equal to ModelOpt's
# NVFP4QTensor, and the static (per-block amax) fake quant of the MSE / local-Hessian weight recipes
_CPU_LIB = None
_STATIC_PATCHED = False


def nvfp4_static_fake_quant_cpu(x: Tensor, amax: Tensor, global_amax: Tensor | None = None,
                                quantize_block_scales: bool = True, fp8_max: float = E4M3_MAX,
                                out_dtype: torch.dtype | None = None) -> Tensor:
    """ModelOpt's static NVFP4 fake quant (static_blockwise_fp4_fake_quant, a Triton kernel: CUDA only) on CPU.

    amax holds one calibrated amax per 16-block of x (e.g. chosen by the MSE FP8 scale sweep); block scale
    amax / 6 fake-quantized to e4m3 against global_amax (ModelOpt's fp8_eager, as compute_fp4_scales does), then
    e2m1 rounding with the kernel's decision boundaries (ties to even); a zero block scale gives a zero block."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    scale = amax.float().reshape(-1, 1) / E2M1_MAX
    if quantize_block_scales:
        g = (global_amax if global_amax is not None else amax.float().amax()).float()
        scale = fp8_eager(scale, g * (E4M3_MAX / fp8_max) / E2M1_MAX)
    xf = x.float().reshape(scale.shape[0], -1)
    q = e2m1_fake_quant(xf, torch.where(scale == 0, torch.ones_like(scale), scale))
    return torch.where(scale == 0, torch.zeros_like(q), q).reshape(x.shape).to(out_dtype or x.dtype)


def _install_cpu_nvfp4_static_kernel() -> None:
    """Route CPU tensors of ModelOpt's static NVFP4 fake quant (StaticBlockwiseFP4FakeQuantFunction, used by the
    MSE / local-Hessian weight recipes) to nvfp4_static_fake_quant_cpu; CUDA tensors keep the Triton kernel.
    A patched autograd Function, not a torch.library op: only the weight fake quant of a calibrated model runs
    it (the ONNX graphs are built from the checkpoint, dgemma.export.quantized)."""
    global _STATIC_PATCHED
    if _STATIC_PATCHED:
        return
    from modelopt.torch.quantization import tensor_quant as tq

    cls = tq.StaticBlockwiseFP4FakeQuantFunction
    orig = cls.forward

    def forward(ctx, x, amax, global_amax=None, quantize_block_scales=True, fp8_max_for_normalization=E4M3_MAX,
                out_dtype=None, pass_through_bwd=False):
        if x.is_cuda:
            return orig(ctx, x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization, out_dtype,
                        pass_through_bwd)
        return nvfp4_static_fake_quant_cpu(x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization,
                                           out_dtype)

    cls.forward = staticmethod(forward)
    _STATIC_PATCHED = True


def install_cpu_nvfp4_kernel() -> None:
    """Register the CPU kernel for torch.library op tensorrt::dynamic_block_quantize_op (idempotent), and the CPU
    path of the static NVFP4 weight fake quant.

    A registered kernel (not a patched Python global) keeps the op in traced graphs for ONNX export."""
    global _CPU_LIB
    _install_cpu_nvfp4_static_kernel()
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


def quantize_model(model, precision: str, loop, recipe_name: str | None = None) -> nn.Module:
    """In place: ModelOpt quantize + calibration through `loop(model)` with a recipe (default: the precision's
    DEFAULT_RECIPE). Weight-only recipes calibrate the input quantizers with the rest (their amax is the
    checkpoint's input_scale) and disable them afterwards, so the fake-quant model is the weight-only model."""
    mtq = _mtq()
    r = get_recipe(precision, recipe_name)
    install_cpu_nvfp4_kernel()
    register_experts()
    with torch.no_grad():
        model = mtq.quantize(model, recipe(precision, r.name), loop)
    if not r.activations:
        mtq.disable_quantizer(model, "*input_quantizer")
    return model


def quantizer_summary(model) -> dict[str, bool]:
    """Quantizer name -> enabled."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.is_enabled for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
