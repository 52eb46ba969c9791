"""The two passes as static-shape modules over fixed-capacity KV buffers (IO contract v2, dgemma.core.contract):
`EncoderGraph` and `DenoiserGraph`, and the masks they build from each row's `past_length`.

The same arithmetic as DiffusionGemma.encode / denoise, but rows of a batch may sit at different positions and no
shape depends on a length: what ONNX export traces, what the torch graph models of the Triton repository run, and
what batches concurrent requests in-process. Knows nothing of ONNX, files or sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modeling import DiffusionGemma, repeat_kv


def attend(attn, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA, scale 1.0, GQA by repeat_kv (the legacy exporter cannot convert enable_gqa)."""
    if attn.groups > 1:
        k, v = repeat_kv(k, attn.groups), repeat_kv(v, attn.groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def encoder_mask(past_length: Tensor, cap: int, s: int, window: int | None, keep: int) -> Tensor:
    """Encoder mask [B,1,S,cap+S] (True = attend) over keys = KV buffer slots (cap) followed by the S new tokens.

    Full layers: slot k holds position k, valid iff k < P_b. Sliding layers (window W, keep = W-1): slot k holds
    position P_b - L_b + k with L_b = min(P_b, keep); query j (position P_b + j) sees it iff k < L_b and
    k > L_b + j - W. New key k' is seen iff k' <= j (and k' > j - W when sliding).
    """
    dev = past_length.device
    j = torch.arange(s, device=dev)[:, None]  # [S,1]
    k = torch.arange(cap, device=dev)[None, :]  # [1,cap]
    kn = torch.arange(s, device=dev)[None, :]  # [1,S]
    lengths = past_length.reshape(-1, 1, 1, 1)
    new = kn <= j
    if window is None:
        old = k < lengths  # [B,1,1,cap]
        old = old.expand(-1, 1, s, -1)
    else:
        lengths = lengths.clamp(max=keep)
        old = (k < lengths) & (k > lengths + j - window)  # [B,1,S,cap]
        new = new & (kn > j - window)
    return torch.cat([old, new[None, None].expand(old.shape[0], 1, s, s)], dim=-1)


def prefix_mask(past_length: Tensor, cap: int, c: int, sliding: bool, keep: int) -> Tensor:
    """Denoiser mask [B,1,1,cap+C]: the valid buffer slots (P_b full, min(P_b, W-1) sliding) and every canvas
    key; every canvas query sees the same keys (spec §14 risk 2)."""
    lengths = past_length.reshape(-1, 1, 1, 1)
    if sliding:
        lengths = lengths.clamp(max=keep)
    old = torch.arange(cap, device=past_length.device)[None, None, None, :] < lengths
    return torch.cat([old, torch.ones_like(old[..., :1]).expand(-1, 1, 1, c)], dim=-1)


class EncoderGraph(nn.Module):
    """(input_ids, position_ids, past_length, past_key_0, past_value_0, ...) -> (new_key_0, new_value_0, ...).

    Same arithmetic as DiffusionGemma.encode over fixed-capacity buffers (contract v2): the new tokens attend
    to the valid buffer slots and causally to each other; only their K/V leave the graph (the runtime appends
    them, dgemma.runtime.kvbuf). The last layer only computes its K/V (generation never reads the encoder's
    hidden states).
    """

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_length: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.cfg
        s = input_ids.shape[1]
        rope = m.rope(position_ids, m.dtype)
        x = m.embed(input_ids)
        news: list[Tensor] = []
        masks: dict[bool, Tensor] = {}
        last = len(m.layers) - 1
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            cos, sin = rope[at.sliding]
            h = layer.input_layernorm(x)
            if i == last:
                k, v = at.kv(h, cos, sin)
            else:
                q, k, v = at.qkv(h, cos, sin)
            news += [k, v]
            if i == last:
                break
            pk, pv = past[2 * i], past[2 * i + 1]
            if at.sliding not in masks:  # one mask per layer kind (all layers of a kind share the capacity)
                masks[at.sliding] = encoder_mask(past_length, pk.shape[-2], s,
                                                 cfg.sliding_window if at.sliding else None, cfg.sliding_cache_len)
            a = attend(at, q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2), masks[at.sliding])
            r = x + layer.post_attention_layernorm(at.out(a))
            x = layer.ffn(r, m.encoder_layer_scalars[i : i + 1].to(r.dtype))
        return tuple(news)


class DenoiserGraph(nn.Module):
    """(canvas_ids, sc_embeds, temperature, position_ids, past_length, past...) -> (logits fp32, next_sc_embeds).

    Bidirectional over the canvas; every canvas query sees the same prefix keys: the valid slots of each
    layer's buffer (all P for full layers, the last min(P, W-1) for sliding layers) and the whole canvas.
    next_sc_embeds = soft_embed(logits / temperature) (spec §10, "better for production").
    """

    def __init__(self, model: DiffusionGemma):
        super().__init__()
        self.model = model

    def forward(self, canvas_ids: Tensor, sc_embeds: Tensor, temperature: Tensor, position_ids: Tensor,
                past_length: Tensor, *past: Tensor) -> tuple[Tensor, Tensor]:
        m, cfg = self.model, self.model.cfg
        c = canvas_ids.shape[1]
        rope = m.rope(position_ids, m.dtype)
        e = m.embed(canvas_ids)
        x = m.self_conditioning(e, sc_embeds.to(e.dtype))
        masks: dict[bool, Tensor] = {}
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            cos, sin = rope[at.sliding]
            q, k, v = at.qkv(layer.input_layernorm(x), cos, sin)
            pk, pv = past[2 * i], past[2 * i + 1]
            if at.sliding not in masks:
                masks[at.sliding] = prefix_mask(past_length, pk.shape[-2], c, at.sliding, cfg.sliding_cache_len)
            a = attend(at, q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2), masks[at.sliding])
            r = x + layer.post_attention_layernorm(at.out(a))
            x = layer.ffn(r, layer.layer_scalar.to(r.dtype))
        logits = m.logits(x)
        return logits, m.soft_embed(logits / temperature.reshape(-1, 1, 1))
