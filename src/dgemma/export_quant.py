"""Quantized ONNX graphs (fp8, nvfp4) from a `dgemma quantize` output (quantize/<precision>/).

Owns: reading and checking the quantize directory; the *export model* (the native DiffusionGemma whose quantized
nn.Linear / Experts modules are swapped for `QLinear` / `QExperts`, holding the stored FP8 / NVFP4 tensors as
buffers); the torch.library ops those modules call and their ONNX translations (dynamo
`custom_translation_table`); the fingerprint that lets later stages refuse graphs whose quantize input changed.
export.py still drives the export (wrappers, dims, manifest, atomic output); this module knows nothing of them.

What is quantized is what the checkpoint says: a module is swapped iff quantize wrote scales for it, and quantize
decides that through quant.EXCLUDED (router, embedding / LM head, norms, self-conditioning stay unquantized).

Graph forms (opset 23; verified: ORT 1.31 CPU, TensorRT-RTX 1.7 AOT, strongly typed):
  fp8   float32 graph. Weights FLOAT8E4M3FN initializers -> DequantizeLinear (per tensor; per expert, axis 0, for the
        3-D expert weights); every quantized matmul input QuantizeLinear -> DequantizeLinear with the calibrated
        input_scale. All ai.onnx: ONNX Runtime runs it (session.disable_quant_qdq=1, see ORT_SESSION_CONFIG) and
        TensorRT-RTX builds it for SM89 and SM120.
  nvfp4 bfloat16 graph (the checkpoint dtype; fp16 risks overflow in Gemma's residual stream). Weights FLOAT4E2M1
        [.., K] + FLOAT8E4M3FN block scales [.., K/16] (+ fp32 global scale, per expert for experts) through two
        DequantizeLinear (block_size 16, axis -1); activations trt::TRT_FP4DynamicQuantize (block 16, fp32 global
        scale = input_scale) + the same two DQ. TensorRT-RTX builds it for SM120/121 only; ONNX Runtime has no
        FP4 kernels and no trt domain, so OrtBackend refuses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import graphs
from .errors import ArtifactError, ConfigError

QUANTIZED = ("fp8", "nvfp4")
OPSET = 23  # FLOAT4E2M1 and DequantizeLinear's output_dtype need 23; FP8 Q/DQ needs >= 19
NVFP4_BLOCK = 16
E4M3_MAX = 448.0
# ONNX Runtime's QDQ fusions turn FP8 DQ->MatMul into MatMulIntegerToFloat, which has no FP8 kernel ("Type
# 'tensor(float8e4m3fn)' of input parameter ... is invalid"); with this entry ORT runs the Q/DQ nodes as written.
ORT_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
QUANTIZE_MANIFEST = "manifest.json"
# modules whose weight is read raw (not through forward), so they cannot hold a quantized weight
_RAW_WEIGHT = ("router.proj",)


def _fix(precision: str) -> str:
    return f"make quantize PRECISION={precision}"


def default_dir(precision: str) -> Path:
    from .quant import DEFAULT_OUT

    return DEFAULT_OUT / precision


# -- quantize directory ------------------------------------------------------------------------------------------
def quantize_fingerprint(quant_dir: str | Path) -> str:
    """sha256 of quantize/<p>/manifest.json + config.json + the safetensors names and sizes (no weight bytes read):
    changes whenever `dgemma quantize` rewrites the directory with different inputs or settings."""
    from .export import checkpoint_fingerprint

    quant_dir = Path(quant_dir)
    h = hashlib.sha256((quant_dir / QUANTIZE_MANIFEST).read_bytes())
    h.update(checkpoint_fingerprint(quant_dir).encode())
    return h.hexdigest()


def read_quantize_dir(quant_dir: str | Path, precision: str, checkpoint: str | Path | None = None) -> dict:
    """The quantize manifest after checking the directory is a complete `dgemma quantize` output for `precision`
    (and, with `checkpoint`, that it was made from that checkpoint's current bytes)."""
    from .quant import file_hash
    from .quant_export import QUANT_ALGO

    quant_dir = Path(quant_dir)
    fix = _fix(precision)
    if precision not in QUANTIZED:
        raise ConfigError(f"precision {precision!r} is not a quantized precision; valid: {', '.join(QUANTIZED)}.")
    if not quant_dir.is_dir():
        raise ArtifactError(f"quantized model {quant_dir} not found: --precision {precision} exports from a "
                            f"`dgemma quantize` output. Make it with: {fix} (or pass --quantized DIR).")
    for f in (QUANTIZE_MANIFEST, "hf_quant_config.json", "config.json", "model.safetensors"):
        if not (quant_dir / f).is_file():
            raise ArtifactError(f"{quant_dir}/{f} not found (incomplete quantize output). Rebuild with: {fix}")
    try:
        m = json.loads((quant_dir / QUANTIZE_MANIFEST).read_text())
        algo = json.loads((quant_dir / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ArtifactError(f"{quant_dir}: unreadable quantize manifest or hf_quant_config.json ({e}). "
                            f"Rebuild with: {fix}") from None
    if m.get("stage") != "quantize" or m.get("precision") != precision or algo != QUANT_ALGO[precision]:
        raise ArtifactError(f"{quant_dir} holds a {m.get('precision')!r} ({algo}) quantization, not {precision!r}. "
                            f"Pass the {precision} directory with --quantized, or rebuild with: {fix}")
    if checkpoint is not None:
        ck = Path(checkpoint)
        got = file_hash(ck) if ck.exists() else "missing"
        if got != m.get("input_checkpoint_sha256"):
            raise ArtifactError(f"{quant_dir} was quantized from {m.get('input_checkpoint')} (sha256 "
                                f"{str(m.get('input_checkpoint_sha256'))[:12]}...), but --checkpoint {ck} has sha256 "
                                f"{got[:12]}... (stale quantized model). Rebuild with: {fix} CKPT={ck}")
    return m


def check_quantize_source(onnx_dir: str | Path, manifest: dict) -> None:
    """Refuse graphs whose quantize directory changed after export (re-quantized: stale ONNX). A quantize directory
    that no longer exists is not an error: the graphs carry every weight and scale themselves."""
    q = manifest.get("quantize")
    if not q:
        return
    src = Path(q["dir"])
    if not (src / QUANTIZE_MANIFEST).is_file():
        return
    got = quantize_fingerprint(src)
    if got != q["fingerprint"]:
        p = manifest.get("precision")
        raise ArtifactError(f"{onnx_dir}: exported from {src} (fingerprint {q['fingerprint'][:12]}...), which is now "
                            f"{got[:12]}... (re-quantized after export: stale ONNX). Rebuild with `make onnx "
                            f"PRECISION={p}` (dgemma export --precision {p} --quantized {src}).")


# -- torch ops (reference arithmetic = the ONNX semantics) and their ONNX translations ----------------------------
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _per_axis0(scale: Tensor, rank: int) -> Tensor:
    """A scalar stays a scalar; a per-expert [E] scale broadcasts over the trailing dims of a rank-`rank` tensor."""
    return scale if scale.dim() == 0 else scale.reshape((-1,) + (1,) * (rank - 1))


@torch.library.custom_op("dgemma::fp8_qdq", mutates_args=())
def fp8_qdq(x: Tensor, scale: Tensor) -> Tensor:
    """QuantizeLinear(x, scale) -> FLOAT8E4M3FN (x / scale, saturate to +-448, round to nearest even) ->
    DequantizeLinear (* scale), in fp32; scale = calibrated amax / 448 (ModelOpt multiplies by 448 / amax: the
    two can differ in the last fp32 bit before rounding to e4m3)."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


@fp8_qdq.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("dgemma::fp8_dq", mutates_args=())
def fp8_dq(w: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """DequantizeLinear of a stored FLOAT8E4M3FN weight: per-tensor scale, or [E] per expert on axis 0."""
    return (w.float() * _per_axis0(scale, w.dim())).to(dtype)


@fp8_dq.register_fake
def _(w, scale, dtype):
    return torch.empty(w.shape, dtype=dtype, device=w.device)


@torch.library.custom_op("dgemma::nvfp4_qdq", mutates_args=())
def nvfp4_qdq(x: Tensor, global_scale: Tensor) -> Tensor:
    """Dynamic NVFP4 of an activation along its last dim: e2m1 in 16-blocks, e4m3 block scales relative to the
    calibrated fp32 global scale (ModelOpt's arithmetic, quant.nvfp4_fake_quant_scaled)."""
    from .quant import nvfp4_fake_quant_scaled

    return nvfp4_fake_quant_scaled(x, NVFP4_BLOCK, global_scale.float())


@nvfp4_qdq.register_fake
def _(x, global_scale):
    return torch.empty_like(x)


@torch.library.custom_op("dgemma::nvfp4_dq", mutates_args=())
def nvfp4_dq(w: Tensor, block_scale: Tensor, global_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Two DequantizeLinear: block scales e4m3 [.., K/16] * global (scalar, or [E] on axis 0) -> `dtype`; then
    e2m1 weights [.., K] (stored as packed pairs, low nibble first) * the block scale of each 16-block."""
    b = w.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).long()
    s = (block_scale.float() * _per_axis0(global_scale.float(), w.dim())).to(dtype)
    return (_E2M1.to(w.device)[codes] * s.float().repeat_interleave(NVFP4_BLOCK, dim=-1)).to(dtype)


@nvfp4_dq.register_fake
def _(w, block_scale, global_scale, dtype):
    return torch.empty((*w.shape[:-1], w.shape[-1] * 2), dtype=dtype, device=w.device)


def _onnx_dtype(dtype) -> int:
    import onnx

    if isinstance(dtype, torch.dtype):
        return {torch.float32: onnx.TensorProto.FLOAT, torch.bfloat16: onnx.TensorProto.BFLOAT16,
                torch.float16: onnx.TensorProto.FLOAT16}[dtype]
    return int(dtype)  # an onnx_ir DataType


def _register_trt_schema() -> None:
    """Schema of TensorRT's trt::TRT_FP4DynamicQuantize (ModelOpt's NVFP4 activation op), so onnxscript can emit it."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("TRT_FP4DynamicQuantize", "trt"):
        return
    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "TRT_FP4DynamicQuantize", "trt", 1,
        doc="TensorRT dynamic NVFP4 quantization: X -> (e2m1 X, e4m3 block scales relative to `scale`).",
        inputs=[p("X", "T1"), p("scale", "T2")], outputs=[p("Y", "T3"), p("Y_scale", "T4")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(float)"], ""), ("T3", ["tensor(float4e2m1)"], ""),
                          ("T4", ["tensor(float8e4m3fn)"], "")],
        attributes=[a("axis", OpSchema.AttrType.INT, ""), a("block_size", OpSchema.AttrType.INT, ""),
                    a("scale_type", OpSchema.AttrType.INT, "")]))


def translation_table(precision: str) -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(dynamo=True, custom_translation_table=...)."""
    import onnx
    import onnx_ir as ir
    import onnxscript
    from onnxscript import opset23 as op

    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    f32 = onnx.TensorProto.FLOAT
    # opset 23 would lower SDPA to the ONNX Attention op, which TensorRT-RTX cannot build in fp32 ("Attention operation
    # was not supported by a dedicated kernel"); keep the MatMul/Softmax form of the plain (opset 18) graphs
    common = {torch.ops.aten.scaled_dot_product_attention.default: aten_scaled_dot_product_attention}

    def fp8_qdq_onnx(x, scale):
        zp = op.Constant(value=ir.tensor(torch.zeros((), dtype=torch.float8_e4m3fn), name="fp8_zero_point"))
        out = {} if _onnx_dtype(x.dtype) == f32 else {"output_dtype": _onnx_dtype(x.dtype)}
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp, **out)

    def fp8_dq_onnx(w, scale, dtype):
        out = {} if _onnx_dtype(dtype) == f32 else {"output_dtype": _onnx_dtype(dtype)}
        return op.DequantizeLinear(w, scale, axis=0, **out)

    if precision == "fp8":
        return common | {torch.ops.dgemma.fp8_qdq.default: fp8_qdq_onnx, torch.ops.dgemma.fp8_dq.default: fp8_dq_onnx}

    _register_trt_schema()
    trt = onnxscript.values.Opset("trt", 1)

    # the block-scale DQ writes the graph dtype, so the e2m1 DQ's scale and output share it (TensorRT's strongly
    # typed DQ rules reject an fp32 scale with a bf16 output on the 3-D expert weights)
    def nvfp4_qdq_onnx(x, global_scale):
        q, s = trt.TRT_FP4DynamicQuantize(x, global_scale, axis=-1, block_size=NVFP4_BLOCK,
                                          scale_type=onnx.TensorProto.FLOAT8E4M3FN)
        s = op.DequantizeLinear(s, global_scale, output_dtype=_onnx_dtype(x.dtype))
        return op.DequantizeLinear(q, s, axis=-1, block_size=NVFP4_BLOCK)

    def nvfp4_dq_onnx(w, block_scale, global_scale, dtype):
        s = op.DequantizeLinear(block_scale, global_scale, axis=0, output_dtype=_onnx_dtype(dtype))
        return op.DequantizeLinear(w, s, axis=-1, block_size=NVFP4_BLOCK)

    return common | {torch.ops.dgemma.nvfp4_qdq.default: nvfp4_qdq_onnx,
                     torch.ops.dgemma.nvfp4_dq.default: nvfp4_dq_onnx}


# -- export model --------------------------------------------------------------------------------------------------
class QLinear(nn.Module):
    """nn.Linear (no bias) holding the stored low-precision weight: y = QDQ(x) @ DQ(W)^T."""

    def __init__(self, precision: str, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                 weight_scale_2: Tensor | None = None):
        super().__init__()
        self.precision = precision
        self.register_buffer("weight", weight)  # fp8 [N, K] | float4_e2m1fn_x2 [N, K/2]
        self.register_buffer("weight_scale", weight_scale.float() if precision == "fp8" else weight_scale)
        self.register_buffer("input_scale", input_scale.float())
        if weight_scale_2 is not None:
            self.register_buffer("weight_scale_2", weight_scale_2.float())

    def forward(self, x: Tensor) -> Tensor:
        if self.precision == "fp8":
            return F.linear(fp8_qdq(x, self.input_scale), fp8_dq(self.weight, self.weight_scale, x.dtype))
        return F.linear(nvfp4_qdq(x, self.input_scale),
                        nvfp4_dq(self.weight, self.weight_scale, self.weight_scale_2, x.dtype))


class QExperts(nn.Module):
    """Routed experts with stored low-precision 3-D weights (per-expert scales), dense over all experts as
    Experts._dense (the export form): each projection's input quantized once with its shared input_scale."""

    def __init__(self, precision: str, num_experts: int, inter: int, tensors: dict[str, Tensor]):
        super().__init__()
        self.precision, self.num_experts, self.inter = precision, num_experts, inter
        self.impl = "dense"  # export.py toggles impl on every layer's experts; this module is always dense
        for k, v in tensors.items():
            self.register_buffer(k, v.float() if k.endswith(("input_scale", "scale_2")) or
                                 (precision == "fp8" and k.endswith("weight_scale")) else v)

    def _proj(self, x: Tensor, name: str) -> Tensor:
        """x [T, K] or [E, T, K] -> [E, T, N] = QDQ(x) @ DQ(W_e)^T for every expert e."""
        w, s = getattr(self, name), getattr(self, f"{name}_weight_scale")
        if self.precision == "fp8":
            xq, wd = fp8_qdq(x, getattr(self, f"{name}_input_scale")), fp8_dq(w, s, x.dtype)
        else:
            xq = nvfp4_qdq(x, getattr(self, f"{name}_input_scale"))
            wd = nvfp4_dq(w, s, getattr(self, f"{name}_weight_scale_2"), x.dtype)
        return torch.matmul(xq if xq.dim() == 3 else xq.unsqueeze(0), wd.transpose(-2, -1))

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        dense_w = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        dense_w = dense_w.scatter(1, idx, weights)  # [T, E]
        gate, up = self._proj(x, "gate_up_proj").split(self.inter, dim=-1)  # [E, T, I] each
        y = self._proj(F.gelu(gate, approximate="tanh") * up, "down_proj")  # [E, T, H]
        return (y.float() * dense_w.t().unsqueeze(-1)).sum(dim=0).to(x.dtype)


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

    from .checkpoint import DECODER, ENCODER_SCALAR, SINGLE, load_config
    from .model import DiffusionGemma, Experts, torch_dtype
    from .quant_export import SCALE_SUFFIXES

    quant_dir = Path(quant_dir)
    cfg, _ = load_config(quant_dir)
    dtype = torch_dtype(graphs.kv_dtype(precision))
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
                                    "stay excluded (dgemma.quant.EXCLUDED). Rebuild with: " + _fix(precision))
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


def is_export_model(model) -> bool:
    return bool(getattr(model, "quantized_modules", None))


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
    from .export import DEFAULT_OUT, export_onnx

    quant_dir = Path(quant_dir) if quant_dir else default_dir(precision)
    qm = read_quantize_dir(quant_dir, precision, checkpoint)
    model = load_export_model(quant_dir, precision)
    src = Path(qm["input_checkpoint"])
    spec = QuantizedExport(precision, translations=translation_table(precision), manifest={
        "quantize": {"dir": str(quant_dir.resolve()), "fingerprint": quantize_fingerprint(quant_dir),
                     "input_checkpoint": qm["input_checkpoint"],
                     "input_checkpoint_sha256": qm.get("input_checkpoint_sha256"),
                     "calib_sha256": qm.get("calib_sha256"), "modelopt": qm.get("versions", {}).get("modelopt"),
                     "excluded": qm.get("excluded")},
        "quantization": describe(precision) | {"graph_dtype": graphs.kv_dtype(precision),
                                               "quantized_modules": model.quantized_modules},
    })
    # the graphs are served next to the original checkpoint (tokenizer, sampler): record it, as a plain export does
    ck = src if (src / "config.json").is_file() else None
    return export_onnx(model, precision, out_root or DEFAULT_OUT, checkpoint=ck, exporter="dynamo", quantized=spec)


# -- reference -----------------------------------------------------------------------------------------------------
def modelopt_reference(quant_dir: str | Path, dtype: torch.dtype | None = None):
    """The ModelOpt fake-quant model of a quantize directory (its input checkpoint + the restored quantizer state):
    the arithmetic the graphs reproduce. Tests and checks only; needs the input checkpoint and modelopt."""
    import modelopt.torch.opt as mto

    from .checkpoint import load_checkpoint
    from .quant import install_cpu_nvfp4_kernel, register_experts

    quant_dir = Path(quant_dir)
    m = json.loads((quant_dir / QUANTIZE_MANIFEST).read_text())
    model = load_checkpoint(m["input_checkpoint"]).model
    if dtype is not None:
        model = model.to(dtype)
    install_cpu_nvfp4_kernel()
    register_experts()
    state = torch.load(quant_dir / "modelopt_state.pth", weights_only=False)
    model = mto.restore_from_modelopt_state(model, state["modelopt_state"])
    res = model.load_state_dict(state["quantizer_state_dict"], strict=False)
    if res.unexpected_keys:
        raise ArtifactError(f"{quant_dir}/modelopt_state.pth: quantizer state {res.unexpected_keys[:3]} matches no "
                            f"quantizer of the restored model. Rebuild with: {_fix(m.get('precision'))}")
    return model.eval()
