"""The layer pass on the fused kernels (docs/kernels.md item 3), written once for every mode of FastBackend.

Per layer: kernels.qkv (input norm already quantised by the previous kernel; one FP8 GEMM with q/k norms, v_norm,
RoPE and the K/V write in its epilogue) -> kernels.attention -> per-row e4m3 of the attention output + o_proj
(kernels.fp8_gemm) -> kernels.residual_norm.post_attention (residual, post-attention norm, both pre-FFN norms, the
router's top-k) -> dense MLP (gemm_gelu with deferred quantisation, gemm) and the expert module (its own moe
kernel) -> post_ffn (FFN norms, residual, layer scalar, and the next layer's input norm quantised, or the final norm
after the last layer). Owns `FusedLayers` (the weights as the kernels read them, prepared once) and `Unsupported`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ...model.modeling import DiffusionGemma
from .fp8 import Fp8Linear
from .policy import k_attention, k_gemm, k_norm, k_qkv, k_resnorm


class Unsupported(Exception):
    """The model cannot run the fused pass (the message says why); the torch layer pass runs instead."""


@dataclass
class _LayerWeights:
    qkv: tuple[Tensor, Tensor]  # [q; k; v] e4m3 + fp32 per-row scales (k_eq_v layers: [q; k])
    o: tuple[Tensor, Tensor]
    gate_up: tuple[Tensor, Tensor]  # [gate; up]
    down: tuple[Tensor, Tensor]


def _share(parent, names: tuple[str, ...], fused: tuple[Tensor, Tensor]) -> None:
    """Point each Fp8Linear's buffers at its rows of the concatenated weight: one copy in memory, not two."""
    r0 = 0
    for name in names:
        lin = getattr(parent, name)
        if lin is None:
            continue
        n = lin.weight.shape[0]
        lin.weight, lin.scale = fused[0][r0:r0 + n], fused[1][r0:r0 + n]
        r0 += n


class FusedLayers:
    """The weights of every layer as the fused kernels read them; `forward` runs the layers."""

    def __init__(self, model: DiffusionGemma):
        cfg = model.cfg
        if model.dtype != torch.bfloat16:
            raise Unsupported(f"model dtype {model.dtype}: the fused dense kernels keep bf16 activations and KV")
        if k_qkv is None:
            raise Unsupported("triton is not importable")
        if cfg.hidden_size % 16 or cfg.intermediate_size % 16:
            raise Unsupported("hidden and intermediate sizes must be multiples of 16 (TMA rows)")
        self.layers: list[_LayerWeights] = []
        for i, layer in enumerate(model.layers):
            at, mlp = layer.self_attn, layer.mlp
            lins = [at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if not all(lin is None or isinstance(lin, Fp8Linear) for lin in lins):
                raise Unsupported(f"layer {i} has non-FP8 dense projections (quantize_fp8_ with attention=True, or an "
                                  "NVFP4 checkpoint, makes them FP8)")
            if "kernels" not in type(layer.experts).__dict__:
                raise Unsupported(f"layer {i}'s experts are {type(layer.experts).__name__}, not FP8 / NVFP4")
            parts = [(at.q_proj.weight, at.q_proj.scale), (at.k_proj.weight, at.k_proj.scale)]
            if at.v_proj is not None:
                parts.append((at.v_proj.weight, at.v_proj.scale))
            qkv = k_qkv.fuse_qkv(*parts)
            gate_up = k_gemm.cat_weights((mlp.gate_proj.weight, mlp.gate_proj.scale),
                                         (mlp.up_proj.weight, mlp.up_proj.scale))
            proj = layer.router.proj.weight
            if proj.data_ptr() % 16:  # post_attention reads it by TMA descriptor (mmap'd checkpoints: any address)
                proj.data = proj.data.clone()
            _share(at, ("q_proj", "k_proj", "v_proj"), qkv)
            _share(mlp, ("gate_proj", "up_proj"), gate_up)
            self.layers.append(_LayerWeights(qkv, (at.o_proj.weight, at.o_proj.scale), gate_up,
                                             (mlp.down_proj.weight, mlp.down_proj.scale)))
        self.inv_freq = {True: model.inv_freq_sliding.float(), False: model.inv_freq_full.float()}

    def forward(self, fb, st, mode: str, x: Tensor, clock: Callable) -> tuple[Tensor, Tensor | None]:
        """fb: the FastBackend, st: its FastState. x [B,S,H] bf16 (the embedding, after self-conditioning when
        denoising) -> (residual stream [B,S,H], final-normed hidden [B,S,H] bf16, or None for mode enc). Writes K/V
        like the torch pass (sliding: slots W-1.. of the extended buffers; full: cache slots [P, P+S) in the causal
        modes); the caller rolls the sliding buffers."""
        m, cfg = fb.model, fb.cfg
        enc = mode in ("enc", "ar")
        b, s, hsz = x.shape
        eps, w1 = cfg.rms_norm_eps, cfg.sliding_cache_len
        with clock("other"):
            rope = {sl: k_qkv.rope_tables(st.past32, s, inv) for sl, inv in self.inv_freq.items()}
            a8 = k_norm.norm_quant(x, m.layers[0].input_layernorm.weight, eps)
            pos = st.p + fb._ar[:s]
        x2 = x.reshape(b * s, hsz)
        last = len(m.layers) - 1
        hn = None
        for i, (layer, lw) in enumerate(zip(m.layers, self.layers)):
            at = layer.self_attn
            if at.sliding:
                kc, vc, base = st.ext_k[i], st.ext_v[i], w1
            else:
                (kc, vc), base = st.new_kv(i, s), 0
            with clock("dense_gemm"):
                q = k_qkv.qkv_project(*a8, *lw.qkv, n_heads=cfg.num_attention_heads, kv_heads=at.kv_heads,
                                      head_dim=at.head_dim, q_norm=at.q_norm.weight, k_norm=at.k_norm.weight,
                                      cos=rope[at.sliding][0], sin=rope[at.sliding][1], past=st.past32, seq_len=s,
                                      k_cache=kc, v_cache=vc, slot_base=base, eps=eps)
            if enc and not at.sliding:
                with clock("other"):
                    st.cache.k[i].index_copy_(2, pos, kc)
                    st.cache.v[i].index_copy_(2, pos, vc)
            if mode == "enc" and i == last:  # only the K/V of the last layer matter to generation (spec §6)
                break
            with clock("attention"):
                if at.sliding:
                    a = k_attention.attention(q, kc[:, :, :w1], vc[:, :, :w1], kc[:, :, w1:w1 + s],
                                              vc[:, :, w1:w1 + s], st.p, enc, cfg.sliding_window)
                else:
                    a = k_attention.attention(q, st.cache.k[i], st.cache.v[i], kc, vc, st.p, enc, None)
            with clock("dense_gemm"):
                ao = self._o_proj(a, lw, b * s)
            with clock("other"):
                pa = k_resnorm.post_attention(
                    x2, ao, layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
                    layer.pre_feedforward_layernorm_2.weight, layer.router.scale, layer.router.proj.weight,
                    layer.router.per_expert_scale, cfg.top_k_experts, eps, quant_ff=True, quant_ff2=False,
                    ff2_bf16=True)
            with clock("dense_gemm"):
                h, amax = k_gemm.gemm_gelu(pa.ff[0], *lw.gate_up, a_scale=pa.ff[1], amax_out=True)
                h1 = k_gemm.gemm(h, *lw.down, a_amax=amax)
            with clock("moe"):
                h2 = layer.experts(pa.ff2_bf16, pa.weights, pa.experts)
            with clock("other"):
                scalar = (m.encoder_layer_scalars[i:i + 1] if enc else layer.layer_scalar).to(torch.bfloat16)
                w = (layer.post_feedforward_layernorm_1.weight, layer.post_feedforward_layernorm_2.weight,
                     layer.post_feedforward_layernorm.weight)
                if i < last:
                    x2, a8 = k_resnorm.post_ffn(pa.r, h1, h2, *w, scalar, eps,
                                                next_norm=m.layers[i + 1].input_layernorm.weight)
                else:
                    x2, hn = k_resnorm.post_ffn(pa.r, h1, h2, *w, scalar, eps, next_norm=m.norm.weight,
                                                next_quant=False, next_bf16=True)
        out = x2.view(b, s, hsz)
        return out, (None if mode == "enc" else hn.view(b, s, hsz))

    @staticmethod
    def _o_proj(a: Tensor, lw: _LayerWeights, t: int) -> Tensor:
        """o_proj of the attention output (a transposed view of [B,S,nh,hd]: the reshape is free), quantised per row."""
        a8, a_scale = k_norm.quant_rows(a.transpose(1, 2).reshape(t, -1))
        return k_gemm.gemm(a8, *lw.o, a_scale=a_scale)
