"""Quantized linear layers for ONNX export: torch.library ops with the ONNX Q/DQ arithmetic, their ONNX translations,
and the modules that hold stored FP8 / NVFP4 weights and call them.

`QLinear` / `QExperts` replace nn.Linear / Experts in the export model (dgemma.export.quantized). Each calls custom ops
whose eager implementation is the arithmetic of the ONNX nodes they become (so the torch export model is a
runnable reference), and `translation_table(precision)` tells the dynamo exporter to emit those nodes:
QuantizeLinear / DequantizeLinear (opset 23) and, for NVFP4 activations, TensorRT's trt::TRT_FP4DynamicQuantize.
Knows nothing of files, checkpoints or manifests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.lowp import E4M3_MAX, NVFP4_BLOCK, nvfp4_decode, nvfp4_fake_quant_scaled, per_axis0

OPSET = 23  # FLOAT4E2M1 and DequantizeLinear's output_dtype need 23; FP8 Q/DQ needs >= 19


# -- ops (eager arithmetic = the ONNX nodes they become) --------------------------------------------------------


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
    return (w.float() * per_axis0(scale, w.dim())).to(dtype)


@fp8_dq.register_fake
def _(w, scale, dtype):
    return torch.empty(w.shape, dtype=dtype, device=w.device)


@torch.library.custom_op("dgemma::nvfp4_qdq", mutates_args=())
def nvfp4_qdq(x: Tensor, global_scale: Tensor) -> Tensor:
    """Dynamic NVFP4 of an activation along its last dim: e2m1 in 16-blocks, e4m3 block scales relative to the
    calibrated fp32 global scale (ModelOpt's arithmetic, dgemma.model.lowp)."""
    return nvfp4_fake_quant_scaled(x, NVFP4_BLOCK, global_scale.float())


@nvfp4_qdq.register_fake
def _(x, global_scale):
    return torch.empty_like(x)


@torch.library.custom_op("dgemma::nvfp4_dq", mutates_args=())
def nvfp4_dq(w: Tensor, block_scale: Tensor, global_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Two DequantizeLinear: block scales e4m3 [.., K/16] * global (scalar, or [E] on axis 0) -> `dtype`; then
    e2m1 weights [.., K] (stored as packed pairs, low nibble first) * the block scale of each 16-block: the NVFP4
    decoder of dgemma.model.lowp."""
    return nvfp4_decode(w, block_scale, global_scale, dtype)


@nvfp4_dq.register_fake
def _(w, block_scale, global_scale, dtype):
    return torch.empty((*w.shape[:-1], w.shape[-1] * 2), dtype=dtype, device=w.device)


# -- ONNX translations ------------------------------------------------------------------------------------------
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


# -- modules ------------------------------------------------------------------------------------------------------
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
