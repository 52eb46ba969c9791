"""FP8 weights of the fast backend: `Fp8Linear` (per-output-channel e4m3 weights, per-token e4m3 activations),
`Fp8Experts` (the routed experts' FP8 twin, same routing math) and `quantize_fp8_` (in-place conversion of a
DiffusionGemma), with their torch fallbacks (fake-quantised activations, dequantised weights) and the
torch.compile fusion switch of the elementwise pieces. Knows nothing of passes, graphs or sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...model.lowp import fp8_quantize_rows
from ...model.modeling import OPS, Attention, DiffusionGemma, Experts, fuse_ops, grouped_mm
from .policy import OFF, Kernels, k_moe, note

# -- FP8 ---------------------------------------------------------------------------------------------------------
_QUANT = {"rows": fp8_quantize_rows}


def _dispatch_eager(idx: Tensor, e: int, a: int) -> tuple[Tensor, Tensor]:
    """idx [T,k] -> dest (pair -> padded row), offs int32 [E] (group ends), by counting instead of sorting.

    Pair n = t*k + j goes to row start(e_n) + rank_n, rank_n = how many earlier pairs chose the same expert (a
    cumulative sum over a one-hot [T*k, E]): the order a stable sort gives, without the radix-sort kernels and
    without the inverse permutation (the H100 profile had 1.75 ms/step of sorts). Token groups are padded to
    multiples of `a` rows in a buffer of static size T*k + E*(a-1).
    """
    flat = idx.reshape(-1)
    onehot = F.one_hot(flat, e)
    counts = onehot.sum(0)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    padded = (counts + a - 1) // a * a
    pend = torch.cumsum(padded, 0)
    return (pend - padded)[flat] + rank, pend.to(torch.int32)


def _scatter_rows_eager(x: Tensor, dest: Tensor, k: int, rows: int) -> Tensor:
    xs = x.new_zeros(rows, x.shape[-1])
    xs[dest] = x.unsqueeze(1).expand(-1, k, -1).reshape(-1, x.shape[-1])
    return xs


def _combine_eager(y: Tensor, dest: Tensor, weights: Tensor, t: int, k: int) -> Tensor:
    return (y[dest] * weights.reshape(-1).unsqueeze(-1)).view(t, k, -1).sum(dim=1)


_MOE = {"dispatch": _dispatch_eager, "scatter": _scatter_rows_eager, "combine": _combine_eager}


def _quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    return _QUANT["rows"](x)


def enable_fusion() -> None:
    """CUDA only: torch.compile the elementwise pieces (norms, RoPE, GELU*up, activation quantisation).

    Measured on H100 (full size, FP8): the step was 7,672 kernels, ~25 ms of them tiny elementwise/cast/reduce
    kernels; fusing them is the largest single item after the expert GEMMs."""
    fuse_ops()
    _QUANT["rows"] = torch.compile(fp8_quantize_rows)
    for name, fn in (("dispatch", _dispatch_eager), ("scatter", _scatter_rows_eager), ("combine", _combine_eager)):
        _MOE[name] = torch.compile(fn)


def _dequant_rows(x: Tensor) -> Tensor:
    """fp32 e4m3(x) * scale per token: the activations _scaled_mm multiplies, for the torch fallbacks."""
    q, s = _quant_rows(x)
    return q.float() * s


_SCALED = {"mm": None, "grouped": None}  # None = untested, True/False = self-test result


def _scaled_mm_ok(device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if _SCALED["mm"] is None:
        try:
            a, b = torch.randn(32, 64, device=device), torch.randn(48, 64, device=device)
            (qa, sa), (qb, sb) = _quant_rows(a), _quant_rows(b)
            y = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
            ref = (qa.float() * sa) @ (qb.float() * sb).t()
            _SCALED["mm"] = bool(((y.float() - ref).norm() / ref.norm()) < 2e-2)
        except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
            note(f"torch._scaled_mm rowwise unavailable ({type(e).__name__}: {e}); FP8 linears dequantise to bf16")
            _SCALED["mm"] = False
    return _SCALED["mm"]


def _scaled_grouped_ok(device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        if device.type == "cuda":
            note("torch._scaled_grouped_mm missing; FP8 experts dequantise to bf16 each call (slower than bf16)")
        return False
    if _SCALED["grouped"] is None:
        try:
            g, k, n = 4, 64, 48
            a, w = torch.randn(64, k, device=device), torch.randn(g, n, k, device=device)
            (qa, sa), (qw, sw) = _quant_rows(a), _quant_rows(w)
            offs = torch.tensor([16, 32, 48, 64], device=device, dtype=torch.int32)
            y = torch._scaled_grouped_mm(qa, qw.transpose(-2, -1), sa.squeeze(-1), sw.squeeze(-1), offs=offs,
                                         out_dtype=torch.bfloat16)
            deq = qw.float() * sw
            ref = torch.cat([(qa[i * 16:(i + 1) * 16].float() * sa[i * 16:(i + 1) * 16]) @ deq[i].t() for i in range(g)])
            _SCALED["grouped"] = bool(((y.float() - ref).norm() / ref.norm()) < 2e-2)
            if not _SCALED["grouped"]:
                note("torch._scaled_grouped_mm self-test mismatch; FP8 experts dequantise to bf16 each call")
        except Exception as e:  # noqa: BLE001
            note(f"torch._scaled_grouped_mm failed ({type(e).__name__}: {e}); FP8 experts dequantise to bf16 each call")
            _SCALED["grouped"] = False
    return _SCALED["grouped"]


class Fp8Linear(nn.Module):
    """y = x @ (w8 * scale)ᵀ; w8 e4m3 [N,K], scale fp32 [N]. Activations quantised per token at run time."""

    def __init__(self, weight: Tensor):
        super().__init__()
        q, s = _quant_rows(weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", s.squeeze(-1).contiguous())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def dequant(self, dtype) -> Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if _scaled_mm_ok(x.device):
            q, s = _quant_rows(x2)
            y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.scale[None], out_dtype=torch.bfloat16)
            return y.to(x.dtype).reshape(*lead, -1)
        # _scaled_mm's arithmetic in fp32 (e4m3 values times their scales, fp32 sums, one rounding to the output
        # dtype): what the GPU path and the fused kernels compute, not a bf16 matmul of bf16-rounded operands
        return F.linear(_dequant_rows(x2), self.dequant(torch.float32)).to(x.dtype).reshape(*lead, -1)


class Fp8Experts(nn.Module):
    """FP8 twin of model.Experts (same routing math): e4m3 [E,N,K] weights, fp32 [E,N] per-(expert,row) scales."""

    ALIGN = 16  # token groups padded to 16 rows: what the CUTLASS fp8 grouped kernel is known to accept

    def __init__(self, ex: Experts):
        super().__init__()
        self.num_experts, self.inter = ex.num_experts, ex.inter
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(ex, name).detach()
            qs = [_quant_rows(w[i:i + 16]) for i in range(0, w.shape[0], 16)]  # chunks bound the fp32 temporary
            self.register_buffer(name, torch.cat([q for q, _ in qs]))
            self.register_buffer(name + "_scale", torch.cat([s for _, s in qs]).squeeze(-1).contiguous())

    def _mm(self, x: Tensor, name: str, offs: Tensor) -> Tensor:
        w, s = getattr(self, name), getattr(self, name + "_scale")
        if _scaled_grouped_ok(x.device):
            q, sa = _quant_rows(x)
            return torch._scaled_grouped_mm(q, w.transpose(-2, -1), sa.squeeze(-1), s, offs=offs,
                                            out_dtype=torch.bfloat16).to(x.dtype)
        deq = (w.float() * s[..., None]).transpose(-2, -1)  # _scaled_grouped_mm's arithmetic in fp32, as above
        return grouped_mm(_dequant_rows(x), deq, offs).to(x.dtype)

    kernels: Kernels = OFF  # FastBackend hands its policy to the modules it runs

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        return self.kernels.run("moe", lambda: k_moe.fp8_moe(x, weights, idx, self.gate_up_proj,
                                                             self.gate_up_proj_scale, self.down_proj,
                                                             self.down_proj_scale),
                                lambda: self.forward_torch(x, weights, idx))

    def forward_torch(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        """The torch path: counting dispatch, padded groups, _scaled_grouped_mm (or the dequantised fallback)."""
        idx = idx.long()  # one_hot needs int64 (the fused pass routes with int32)
        t, k = idx.shape
        e, a = self.num_experts, self.ALIGN
        dest, offs = _MOE["dispatch"](idx, e, a)
        # static upper bound on padded rows: no shape depends on the routing
        xs = _MOE["scatter"](x, dest, k, t * k + e * (a - 1))
        gate, up = self._mm(xs, "gate_up_proj", offs).chunk(2, dim=-1)
        y = self._mm(OPS.gelu_mul(gate, up), "down_proj", offs)
        return _MOE["combine"](y, dest, weights, t, k).to(x.dtype)


@torch.no_grad()
def quantize_fp8_(model: DiffusionGemma, fp8_lm_head: bool = False, attention: bool = True) -> DiffusionGemma:
    """In place: every layer/self-conditioning nn.Linear -> Fp8Linear, experts -> Fp8Experts, layer by layer so
    the bf16 weights of a layer are freed before the next is converted. Router, norms, embedding stay bf16.
    fp8_lm_head adds e4m3 copies of the tied embedding for the LM head and the soft-embedding GEMM
    (`model.fp8_head`, `model.fp8_soft`); the bf16 embedding itself is kept for the embedding lookup.
    attention=False keeps q/k/v/o in bf16: with scale-1.0 attention over RMS-normed q/k, e4m3 noise in q/k moves
    the scores by O(head_dim * 2^-4), the most sensitive place for FP8 (measured on random weights)."""
    def convert(parent: nn.Module):
        if not attention and isinstance(parent, Attention):
            return
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "proj":  # router.proj stays bf16 (routing decisions)
                setattr(parent, name, Fp8Linear(child.weight))
                del child
            elif isinstance(child, Experts):
                setattr(parent, name, Fp8Experts(child))
                del child
            elif not isinstance(child, (Fp8Linear, Fp8Experts)):
                convert(child)
    for layer in model.layers:
        convert(layer)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    convert(model.self_conditioning)
    if fp8_lm_head:
        e = model.embed_tokens.weight
        model.fp8_head = Fp8Linear(e)
        model.fp8_soft = Fp8Linear(e.t().contiguous())  # [H,V]: per-hidden-channel scales for probs @ E
    return model
