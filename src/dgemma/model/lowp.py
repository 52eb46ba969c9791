"""Low-precision arithmetic shared by quantization, export, the fast backend and the kernels' references: THE
constants of e4m3 and NVFP4, per-row e4m3 scaling, ModelOpt's NVFP4 fake quantization and the NVFP4 decoder.

NVFP4 (ModelOpt's layout): e2m1 values in blocks of 16 along the last dim, packed two per byte (low nibble first),
an e4m3 scale per block, and an fp32 global scale (per tensor, or per expert for the experts). Knows nothing of
files or modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
E2M1_MAX = 6.0  # largest e2m1 magnitude
NVFP4_BLOCK = 16  # elements per e4m3 block scale
# e2m1 code -> value (bit 3 = sign): the decoder's table
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_E2M1_POS = E2M1_VALUES[:8]
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def fp8_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (e4m3 [..., K], fp32 scale [..., 1]): per-row (per-token / per-out-channel) absmax scaling."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (xf / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


def fp8_quantize(w: Tensor, amax: Tensor) -> tuple[Tensor, Tensor]:
    """ModelOpt's scaled_e4m3 order: w * (448 / amax) -> e4m3; scale = amax / 448 (fp32), per tensor or per
    leading index (experts) when amax has several elements."""
    amax = amax.float().reshape(-1)
    shape = (-1,) + (1,) * (w.dim() - 1) if amax.numel() > 1 else ()
    q = (w.float() * (E4M3_MAX / amax).reshape(shape)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, (amax / E4M3_MAX).reshape(-1 if amax.numel() > 1 else ())


def nvfp4_fake_quant(x: Tensor, block: int, amax: Tensor) -> Tensor:
    """x [..., K] (K % block == 0) -> e2m1 values in blocks with e4m3 block scales and fp32 global scale
    amax / (6 * 448), dequantized back to x.dtype. Ties round to even, as ModelOpt's NVFP4QTensor._cast_fp4 does."""
    return nvfp4_fake_quant_scaled(x, block, amax.float().amax() / (E2M1_MAX * E4M3_MAX))


def nvfp4_fake_quant_scaled(x: Tensor, block: int, s2: Tensor) -> Tensor:
    """nvfp4_fake_quant with the fp32 global scale s2 given (the checkpoint's input_scale = amax / (6 * 448))."""
    xf = x.float().reshape(-1, block)
    s = xf.abs().amax(-1, keepdim=True) / (E2M1_MAX * s2)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return e2m1_fake_quant(xf, s * s2).reshape(x.shape).to(x.dtype)


def e2m1_fake_quant(xf: Tensor, scale: Tensor) -> Tensor:
    """xf [n, block] fp32 rounded to e2m1 x scale [n, 1] (ties to even, ModelOpt's decision boundaries),
    dequantized (fp32). The rounding step of the dynamic and the static NVFP4 fake quant."""
    a = (xf / scale).abs()
    idx = torch.bucketize(a, _E2M1_BOUNDS)  # value on a bound -> the lower neighbour ...
    idx = idx + (a.unsqueeze(-1) == _E2M1_BOUNDS[[1, 3, 5]]).any(-1)  # ... except 0.75, 1.75, 3.5: up (even)
    return _E2M1_POS[idx.clamp(max=7)] * torch.where(xf < 0, -1.0, 1.0) * scale


def nvfp4_encode(x: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """The NVFP4 encoder, nvfp4_fake_quant_scaled's arithmetic stored in ModelOpt's layout: x [.., K] (K % 16 == 0)
    and its fp32 global scale (scalar, or [E] on axis 0) -> (packed e2m1 pairs uint8 [.., K/2], low nibble first;
    e4m3 block scales [.., K/16]). nvfp4_decode(*nvfp4_encode(x, s2), s2, fp32) equals
    nvfp4_fake_quant_scaled(x, 16, s2)."""
    s2 = per_axis0(global_scale.float(), x.dim())
    xf = x.float()
    blocks = xf.reshape(*xf.shape[:-1], -1, NVFP4_BLOCK)
    s2b = s2.unsqueeze(-1) if s2.dim() else s2
    s = blocks.abs().amax(-1, keepdim=True) / (E2M1_MAX * s2b)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn)
    a = (blocks / (s.float() * s2b)).abs()
    idx = torch.bucketize(a, _E2M1_BOUNDS.to(a.device))  # as nvfp4_fake_quant_scaled: ties to even
    idx = idx + (a.unsqueeze(-1) == _E2M1_BOUNDS.to(a.device)[[1, 3, 5]]).any(-1)
    codes = (idx.clamp(max=7) | torch.where(blocks < 0, 8, 0)).to(torch.uint8).reshape(xf.shape)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), s.squeeze(-1)


def per_axis0(scale: Tensor, rank: int) -> Tensor:
    """A scalar stays a scalar; a per-expert [E] scale broadcasts over the trailing dims of a rank-`rank` tensor."""
    return scale if scale.dim() == 0 else scale.reshape((-1,) + (1,) * (rank - 1))


def nvfp4_decode(packed: Tensor, block_scale: Tensor, global_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The NVFP4 decoder: packed e2m1 pairs [.., K/2] (uint8 or float4_e2m1fn_x2, low nibble first), e4m3 block
    scales [.., K/16], fp32 global scale (scalar or [E] on axis 0) -> [.., K] in `dtype`. The block scale times the
    global scale is rounded to `dtype` first, as ONNX's two DequantizeLinear nodes do."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).long()
    s = (block_scale.float() * per_axis0(global_scale.float(), packed.dim())).to(dtype)
    return (E2M1_VALUES.to(packed.device)[codes] * s.float().repeat_interleave(NVFP4_BLOCK, dim=-1)).to(dtype)
