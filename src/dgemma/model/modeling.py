"""Native DiffusionGemma text model: causal encoder pass and bidirectional denoiser pass (spec §5-§8).

Own torch code (no transformers classes), written to match transformers 5.23 numerically on the
default DynamicCache + SDPA path, and to export: KV lives in fixed-capacity buffers (`KVCache`),
MoE has no data-dependent Python control flow. Parameter names equal the checkpoint's names with
the `model.decoder.` prefix removed, so loading is a rename. Knows nothing of sampling or files.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import ModelConfig
from ..core.errors import RequestError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else _DTYPES[name]


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Ops:
    """The elementwise pieces of a layer as pure functions. The eager (reference) path uses them as written;
    the CUDA fast path swaps in torch.compile'd versions (`fuse_ops`) so each becomes one or two kernels."""

    @staticmethod
    def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        # Gemma-4 RMSNorm: fp32, x * pow(mean(x^2) + eps, -0.5) * weight (plain weight, not 1+w)
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
        if weight is not None:
            y = y * weight.float()
        return y.type_as(x)

    @staticmethod
    def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return (x * cos) + (rotate_half(x) * sin)

    @staticmethod
    def gelu_mul(gate: Tensor, up: Tensor) -> Tensor:
        return F.gelu(gate, approximate="tanh") * up

    @staticmethod
    def route(x: Tensor, scale: Tensor, proj: Tensor, per_expert_scale: Tensor, root: float, top_k: int,
              eps: float) -> tuple[Tensor, Tensor]:
        """x [T,H] raw residual -> weights [T,k] fp32, experts [T,k] int64 (spec §5.4)."""
        z = Ops.rms_norm(x, None, eps) * scale * root
        probs = F.softmax(F.linear(z, proj), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * per_expert_scale[idx], idx


OPS = Ops()


def fuse_ops() -> None:
    """Replace OPS with torch.compile'd versions (CUDA fast path; changes rounding in the last bits)."""
    import torch._dynamo

    # one function serves ~10 shapes (hidden, per-head q/k of both layer kinds, flat MoE input)
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    for name in ("rms_norm", "rope", "gelu_mul", "route"):
        setattr(OPS, name, torch.compile(getattr(Ops, name)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        return OPS.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig, sliding: bool) -> Tensor:
    """[head_dim/2] fp32. Full layers: proportional RoPE, only the first rotary_dim/2 pairs rotate (spec §5.3)."""
    if sliding:
        dim = cfg.head_dim
        return 1.0 / (cfg.rope_theta_sliding ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    hd = cfg.global_head_dim
    rope_angles = cfg.rotary_dim_full // 2
    inv = 1.0 / (cfg.rope_theta_full ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).float() / hd))
    return torch.cat([inv, torch.zeros(hd // 2 - rope_angles)])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.head_dim = cfg.layer_head_dim(layer)
        self.kv_heads = cfg.layer_kv_heads(layer)
        self.groups = cfg.num_attention_heads // self.kv_heads
        h, q = cfg.hidden_size, cfg.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        # full layers have no v_proj: V = v_norm(k_proj(x)) (attention_k_eq_v, spec §5.3)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False) if self.sliding else None
        self.o_proj = nn.Linear(q, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B,S,H] -> q [B,nh,S,hd], k/v [B,kvh,S,hd] (k post-norm post-RoPE, v post-v_norm)."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        q = OPS.rope(self.q_norm(self.q_proj(x).view(shape)), c, s).transpose(1, 2)
        k, v = self.kv(x, cos, sin)
        return q, k, v

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        shape = (*x.shape[:-1], -1, self.head_dim)
        k_raw = self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape) if self.v_proj is not None else k_raw
        k = OPS.rope(self.k_norm(k_raw), cos.unsqueeze(2), sin.unsqueeze(2))
        return k.transpose(1, 2), self.v_norm(v).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """SDPA with scale 1.0 (no 1/sqrt(d)); GQA handled the way transformers' sdpa path does it."""
        if self.groups > 1:
            if mask is None and self.head_dim <= 256:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=None, scale=1.0, is_causal=causal,
                                                      enable_gqa=True)
            k = repeat_kv(k, self.groups)
            v = repeat_kv(v, self.groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, is_causal=causal)

    def out(self, attn: Tensor) -> Tensor:
        b, _, s, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).contiguous().reshape(b, s, -1))


def repeat_kv(x: Tensor, n: int) -> Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(OPS.gelu_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return OPS.route(x, self.scale, self.proj.weight, self.per_expert_scale, self.root, self.top_k,
                         self.norm.eps)


class Experts(nn.Module):
    """Routed experts as stacked 3-D weights (checkpoint layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]).

    `impl="grouped"`: token-expert pairs sorted by expert, one grouped GEMM per projection (reads each
    expert's weights once; the same formulation and numerics as transformers' default `grouped_mm`).
    `impl="dense"`: every expert on every token, routing weights scattered to [T, E]; exact, 16x the FLOPs,
    used for ONNX export where no grouped-GEMM op exists. Neither has data-dependent Python control flow.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.inter = e, i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.impl = "grouped"

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        if self.impl == "dense":
            return self._dense(x, weights, idx)
        return self._grouped(x, weights, idx)

    def _grouped(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        return grouped_experts(x, weights, idx, self.gate_up_proj, self.down_proj)

    def _dense(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        dense_w = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        dense_w = dense_w.scatter(1, idx, weights)  # [T, E]
        gu = torch.einsum("th,eoh->teo", x, self.gate_up_proj)  # [T, E, 2I]
        gate, up = gu.split(self.inter, dim=-1)
        y = torch.einsum("tei,ehi->teh", F.gelu(gate, approximate="tanh") * up, self.down_proj)
        return (y.float() * dense_w.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def grouped_experts(x: Tensor, weights: Tensor, idx: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Experts.forward ("grouped") over given weights gate_up_proj [E, 2I, H], down_proj [E, H, I] (any module
    that holds its experts in another form dequantises them and calls this)."""
    e = gate_up_proj.shape[0]
    t, k = idx.shape
    expert_ids, perm = torch.sort(idx.reshape(-1))
    xs = x[perm // k]
    ws = weights.reshape(-1)[perm]
    hist_in = expert_ids.float() if x.device.type == "cpu" else expert_ids.int()
    counts = torch.histc(hist_in, bins=e, min=0, max=e - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gu = grouped_mm(xs, gate_up_proj.transpose(-2, -1), offs)
    gate, up = gu.chunk(2, dim=-1)
    y = grouped_mm(OPS.gelu_mul(gate, up), down_proj.transpose(-2, -1), offs)
    y = y * ws.unsqueeze(-1)  # fp32 (routing weights are fp32)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(t, k, -1).sum(dim=1).to(x.dtype)


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x [S,K] sorted by group, w [G,K,N], offs [G] cumulative int32 -> [S,N]."""
    x = x.to(w.dtype)
    # the grouped kernel needs every non-unit stride 16-byte aligned (tiny test shapes may not be)
    aligned = all((st * t.element_size()) % 16 == 0 for t in (x, w) for st in t.stride() if st != 1)
    if aligned and hasattr(F, "grouped_mm") and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 0):
            return F.grouped_mm(x, w, offs=offs)
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):  # fallback only: unaligned tiny shapes / old torch
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


class Layer(nn.Module):
    """One Gemma-4 MoE block; shared by both passes (the layer scalar differs per pass, spec §4)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder (denoiser) scalar

    def ffn(self, r: Tensor, scalar: Tensor) -> Tensor:
        """r = residual after attention [B,S,H] -> layer output (spec §5.4)."""
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        w, idx = self.router(flat)
        h2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).reshape(r.shape)
        h2 = self.post_feedforward_layernorm_2(h2)
        out = r + self.post_feedforward_layernorm(h1 + h2)
        return out * scalar


class SelfConditioning(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, emb: Tensor, soft: Tensor) -> Tensor:
        n = self.pre_norm(soft)
        return self.post_norm(emb + self.down_proj(OPS.gelu_mul(self.gate_proj(n), self.up_proj(n))))


class KVCache:
    """Fixed-capacity per-layer K/V buffers for a batch of sequences sharing one length.

    Full layers: [B, kvh, max_context, hd], valid prefix [0, length). Sliding layers:
    [B, kvh, W-1, hd], holding the last min(length, W-1) tokens in order at [0, n) (spec §6).
    K is stored post-k_norm post-RoPE, V post-v_norm, in the model dtype.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_context: int, dtype: torch.dtype, device):
        self.cfg, self.batch, self.max_context = cfg, batch, max_context
        self.length = 0
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for i in range(cfg.num_hidden_layers):
            cap = cfg.sliding_cache_len if cfg.is_sliding(i) else max_context
            shape = (batch, cfg.layer_kv_heads(i), cap, cfg.layer_head_dim(i))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def valid(self, layer: int) -> int:
        return min(self.length, self.cfg.sliding_cache_len) if self.cfg.is_sliding(layer) else self.length

    def prefix(self, layer: int) -> tuple[Tensor, Tensor]:
        n = self.valid(layer)
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_context:
            raise RequestError(
                f"context of {self.length + new_tokens} tokens exceeds the KV buffers' max_context={self.max_context} "
                f"({self.length} cached + {new_tokens} new). Shorten the prompt, lower max_new_tokens, "
                "or raise max_context."
            )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class DiffusionGemma(nn.Module):
    """Both passes over one set of weights. `encode` writes the cache; `denoise` reads it.

    The passes are differentiable (the tiny trainer uses them); backends call them under no_grad.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        # model.encoder.language_model.layers.{i}.layer_scalar: kept separately (spec §4, risk 5)
        self.register_buffer("encoder_layer_scalars", torch.ones(cfg.num_hidden_layers))
        self.register_buffer("inv_freq_sliding", rope_inv_freq(cfg, True), persistent=False)
        self.register_buffer("inv_freq_full", rope_inv_freq(cfg, False), persistent=False)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: Tensor) -> Tensor:
        # sqrt(hidden) rounded in the weight dtype: 53.0 in bf16 (spec §5.1)
        scale = torch.tensor(self.cfg.hidden_size**0.5, dtype=torch.float32, device=ids.device).to(self.dtype)
        return self.embed_tokens(ids) * scale

    def rope(self, pos: Tensor, dtype: torch.dtype) -> dict[bool, tuple[Tensor, Tensor]]:
        """pos [B|1, S] -> {sliding?: (cos, sin) [B|1, S, hd]} in `dtype`."""
        out = {}
        for sliding, inv in ((True, self.inv_freq_sliding), (False, self.inv_freq_full)):
            freqs = pos[..., None].float() * inv.to(device=pos.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            out[sliding] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def new_cache(self, batch: int, max_context: int) -> KVCache:
        return KVCache(self.cfg, batch, max_context, self.dtype, self.device)

    def logits(self, hidden: Tensor) -> Tensor:
        x = F.linear(self.norm(hidden), self.embed_tokens.weight).float()
        cap = self.cfg.final_logit_softcapping
        return torch.tanh(x / cap) * cap

    def soft_embed(self, sc_logits: Tensor) -> Tensor:
        """Self-conditioning input from the previous step's processed logits [B,C,V] (any float dtype).

        s = bf16(softmax_fp32(bf16(logits))) @ E * bf16(sqrt(H)) (spec §7, §11).
        """
        w = self.embed_tokens.weight
        probs = sc_logits.to(w.dtype).softmax(dim=-1, dtype=torch.float32).to(w.dtype)
        scale = torch.tensor(self.cfg.hidden_size**0.5, dtype=torch.float32, device=w.device).to(w.dtype)
        return torch.matmul(probs, w) * scale

    # -- encoder pass (prefill / commit) ---------------------------------------------------------
    def encode(self, ids: Tensor, cache: KVCache, last_logits: bool = False) -> Tensor | None:
        """Causal pass over ids [B,S] at positions [P, P+S); appends K/V to `cache` (spec §6).

        last_logits=True also runs the last layer and the head and returns logits [B,V] fp32 of the last
        position: the autoregressive use of the same backbone (benchmark baseline only).
        """
        b, s = ids.shape
        cache.check_room(s)
        p = cache.length
        pos = torch.arange(p, p + s, device=ids.device, dtype=torch.int32).unsqueeze(0)
        rope = self.rope(pos, self.dtype)
        x = self.embed(ids)
        w = self.cfg.sliding_window
        masks = {True: _causal_mask(p, s, w, self.cfg.sliding_cache_len, ids.device),
                 False: _causal_mask(p, s, None, None, ids.device)}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            sliding = layer.self_attn.sliding
            cos, sin = rope[sliding]
            h = layer.input_layernorm(x)
            if i == last and not last_logits:  # only the K/V of the last layer are used by generation (spec §6)
                k, v = layer.self_attn.kv(h, cos, sin)
                self._append(cache, i, k, v)
                break
            q, k, v = layer.self_attn.qkv(h, cos, sin)
            k_all, v_all = self._append(cache, i, k, v)
            mask = masks[sliding]
            a = layer.self_attn.attend(q, k_all, v_all, mask, causal=mask is None and s > 1)
            r = x + layer.post_attention_layernorm(layer.self_attn.out(a))
            x = layer.ffn(r, self.encoder_layer_scalars[i : i + 1].to(r.dtype))
        cache.length = p + s
        return self.logits(x[:, -1]) if last_logits else None

    def _append(self, cache: KVCache, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        pk, pv = cache.prefix(i)
        k_all, v_all = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
        if self.cfg.is_sliding(i):
            keep = min(k_all.shape[-2], self.cfg.sliding_cache_len)
            cache.k[i][:, :, :keep] = k_all[:, :, -keep:]
            cache.v[i][:, :, :keep] = v_all[:, :, -keep:]
        else:
            p = cache.length
            cache.k[i][:, :, p : p + k.shape[-2]] = k
            cache.v[i][:, :, p : p + k.shape[-2]] = v
        return k_all, v_all

    # -- denoiser pass ----------------------------------------------------------------------------
    def denoise(self, canvas: Tensor, soft: Tensor | None, cache: KVCache) -> Tensor:
        """canvas [B,C] ids, soft [B,C,H] self-conditioning embeddings (None = zeros) -> logits [B,C,V] fp32.

        Bidirectional over the canvas; reads the cached prefix read-only: full layers all P keys,
        sliding layers the same last min(P, W-1) keys for every canvas query (spec §7).
        """
        return self.logits(self.denoise_hidden(canvas, soft, cache))

    def denoise_hidden(self, canvas: Tensor, soft: Tensor | None, cache: KVCache) -> Tensor:
        b, c = canvas.shape
        p = cache.length
        pos = torch.arange(p, p + c, device=canvas.device, dtype=torch.int32).unsqueeze(0)
        rope = self.rope(pos, self.dtype)
        e = self.embed(canvas)
        x = self.self_conditioning(e, torch.zeros_like(e) if soft is None else soft.to(e.dtype))
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.self_attn.sliding]
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
            pk, pv = cache.prefix(i)
            a = layer.self_attn.attend(q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2), None, False)
            r = x + layer.post_attention_layernorm(layer.self_attn.out(a))
            x = layer.ffn(r, layer.layer_scalar.to(r.dtype))
        return x

    def set_experts_impl(self, impl: str) -> None:
        assert impl in ("grouped", "dense"), impl
        for layer in self.layers:
            layer.experts.impl = impl

    # -- synthetic weights -------------------------------------------------------------------------
    @classmethod
    def random(cls, cfg: ModelConfig, device="cpu", dtype: torch.dtype | str | None = None,
               seed: int = 0) -> "DiffusionGemma":
        """Random weights with the given shapes, created directly on `device` (no checkpoint needed).

        Used for the tiny parity model and for full-size GPU benchmarks (`--checkpoint synthetic`).
        """
        dtype = torch_dtype(dtype or cfg.dtype)
        with torch.device("meta"):
            model = cls(cfg).to(dtype)  # cast on meta: a 26B model is never materialised in fp32
        model.to_empty(device=device)
        model.register_buffer("inv_freq_sliding", rope_inv_freq(cfg, True).to(device), persistent=False)
        model.register_buffer("inv_freq_full", rope_inv_freq(cfg, False).to(device), persistent=False)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("router.scale"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
                elif name.endswith("per_expert_scale"):
                    p.copy_(1.0 + 0.1 * torch.rand(p.shape, generator=gen, device=device))
                else:
                    p.normal_(0.0, 0.02, generator=gen)
            model.encoder_layer_scalars.fill_(1.0)
            for layer in model.layers:
                layer.layer_scalar.fill_(1.0)
        return model.eval()


def _causal_mask(p: int, s: int, window: int | None, keep: int | None, device) -> Tensor | None:
    """Encoder mask [1,1,S,K] (True = attend) over keys = cached ⊕ new, as transformers builds it for SDPA.

    None where transformers skips the mask and lets SDPA use is_causal (no cache, no window cut).
    """
    n_cached = p if window is None else min(p, keep)
    kv = n_cached + s
    if n_cached == 0 and (window is None or kv < window):
        return None
    q_pos = torch.arange(p, p + s, device=device)[:, None]
    k_pos = torch.arange(p - n_cached, p + s, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask[None, None]
