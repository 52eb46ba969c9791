"""The fast backend's state and passes: `FastState` (fixed KV buffers of one batch) and `FastBackend` (the Backend
protocol over a DiffusionGemma with static shapes and CUDA-graph replay).

Shapes never depend on the prefix length P: K/V live in fixed buffers and P enters only as a device tensor that
builds the masks and RoPE positions. On CPU the same code runs eagerly (tests); on CUDA the denoise step (and the
256-token commit) is captured once per (batch, key-span bucket) and replayed. Knows nothing of sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ...model.modeling import DiffusionGemma, KVCache
from .fp8 import enable_fusion, note


# -- static passes -----------------------------------------------------------------------------------------------
@dataclass
class FastState:
    """KV state of one batch: the native KVCache (prefill uses model.encode on it) plus the denoiser's extended
    sliding buffers [B,kvh,W-1+C,hd] whose first W-1 slots *are* the cache's sliding tensors (views)."""
    cache: KVCache
    ext_k: dict[int, Tensor]
    ext_v: dict[int, Tensor]
    p: Tensor  # int64 [1]: P on the device (graphs read it)
    graphs: dict = field(default_factory=dict)
    io: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.cache.length


class FastBackend:
    """Backend protocol over a DiffusionGemma with static shapes and CUDA graphs.

    KV buffers are owned per batch size: `new_state(b)` resets and returns the same buffers each time, so only one
    live state per batch size (graphs hold their addresses). `denoise` returns raw logits as a view of a static
    buffer, overwritten by the next denoise of that state: consume or clone it before the next call (the sampler
    does); next_soft is returned as a fresh tensor because the sampler keeps the previous one.
    """

    def __init__(self, model: DiffusionGemma, max_context: int | None = None, cuda_graphs: bool = True,
                 key_bucket: int = 512, static_commit: bool = True, fuse: bool | None = None):
        self.model, cfg = model, model.cfg
        self.cfg = cfg
        self.vocab_size, self.canvas_length = cfg.vocab_size, cfg.canvas_length
        self.device = model.device
        self.max_context = max_context or min(cfg.max_position_embeddings, 8192)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        if fuse if fuse is not None else self.device.type == "cuda":
            try:
                enable_fusion()
            except Exception as e:  # noqa: BLE001 - inductor missing: eager ops still work
                note(f"torch.compile fusion unavailable ({type(e).__name__}: {e}); running unfused ops")
        self.key_bucket, self.static_commit = key_bucket, static_commit
        self._states: dict[int, FastState] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        dt, dev = model.dtype, self.device
        self._scale = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32, device=dev).to(dt)
        self._ar = torch.arange(cfg.canvas_length, device=dev)
        self._slots = torch.arange(cfg.sliding_cache_len + cfg.canvas_length, device=dev)
        self._kpos = torch.arange(self.max_context, device=dev)

    # -- protocol --------------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> FastState:
        st = self._states.get(batch)
        if st is None:
            cache = self.model.new_cache(batch, self.max_context)
            ext_k, ext_v, w1, c = {}, {}, self.cfg.sliding_cache_len, self.canvas_length
            for i in range(self.cfg.num_hidden_layers):
                if self.cfg.is_sliding(i):
                    for ext, lst in ((ext_k, cache.k), (ext_v, cache.v)):
                        b, h, _, d = lst[i].shape
                        ext[i] = torch.zeros(b, h, w1 + c, d, dtype=lst[i].dtype, device=self.device)
                        lst[i] = ext[i][:, :, :w1]
            st = FastState(cache, ext_k, ext_v, torch.zeros(1, dtype=torch.int64, device=self.device))
            st.io = dict(canvas=torch.zeros(batch, c, dtype=torch.int64, device=self.device),
                          soft=torch.zeros(batch, c, self.cfg.hidden_size, dtype=self.model.dtype, device=self.device),
                          temp=torch.ones((), dtype=torch.float32, device=self.device),
                          ar_ids=torch.zeros(batch, 1, dtype=torch.int64, device=self.device),
                          raw=torch.zeros(batch, c, self.vocab_size, dtype=torch.float32, device=self.device))
            self._states[batch] = st
        st.cache.length = 0
        return st

    def length(self, state: FastState) -> int:
        return state.cache.length

    @torch.no_grad()
    def encode(self, state: FastState, ids: Tensor) -> None:
        p, s = state.cache.length, ids.shape[1]
        if not (self.static_commit and p > 0 and s == self.canvas_length):
            self.model.encode(ids, state.cache)  # prefill: eager native pass, shapes depend on P anyway
            return
        state.cache.check_room(s)
        state.io["canvas"].copy_(ids)
        self._run(state, "enc", p)
        state.cache.length = p + s

    @torch.no_grad()
    def denoise(self, state: FastState, canvas: Tensor, soft: Tensor | None, temperature: Tensor):
        p = state.cache.length
        state.cache.check_room(self.canvas_length)
        io = state.io
        io["canvas"].copy_(canvas)
        if soft is None:
            io["soft"].zero_()
        else:
            io["soft"].copy_(soft)
        io["temp"].copy_(temperature)
        nxt = self._run(state, "den", p)
        return io["raw"], nxt.clone()

    @torch.no_grad()
    def ar_step(self, state: FastState, ids: Tensor) -> Tensor:
        """Autoregressive baseline on the same weights: causal pass over ids [B,S] -> next-token logits [B,V].
        S > 1 (the prompt) runs eagerly; S == 1 is a captured graph like the denoise step."""
        p = state.cache.length
        if ids.shape[1] != 1:
            return self.model.encode(ids, state.cache, last_logits=True)
        state.cache.check_room(1)
        state.io["ar_ids"].copy_(ids)
        out = self._run(state, "ar", p)
        state.cache.length = p + 1
        return out

    # -- graph management --------------------------------------------------------------------------------------
    def _span(self, p: int) -> int:
        need = p + self.canvas_length + 1
        return min(self.max_context, -(-need // self.key_bucket) * self.key_bucket)

    def _run(self, state: FastState, mode: str, p: int):
        state.p.fill_(p)  # a kernel with a scalar argument: no host sync
        span = self._span(p)
        if not self.use_graphs:
            return self._forward(state, mode, span)
        key = (mode, span)
        entry = state.graphs.get(key)
        if entry is not None:
            entry[0].replay()
            return entry[1]
        # the real call doubles as the warm-up; capture only records, so the commit is not applied twice
        out = self._forward(state, mode, span)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                res = self._forward(state, mode, span)
            state.graphs[key] = (g, res)
        except Exception as e:  # noqa: BLE001 - eager still works
            note(f"CUDA graph capture of {mode} failed ({type(e).__name__}: {e}); running eagerly")
            self.use_graphs = False
        return out

    # -- the static pass -----------------------------------------------------------------------------------------
    def _masks(self, p: Tensor, span: int, causal: bool, s: int) -> dict[bool, Tensor]:
        """True = attend. Denoise: [1,1,1,K] (same keys for every canvas query); commit: [1,1,C,K] causal."""
        w, w1, c = self.cfg.sliding_window, self.cfg.sliding_cache_len, self.canvas_length
        n = p.clamp(max=w1)
        j, kpos = self._slots, self._kpos[:span]
        if not causal:
            return {True: ((j < n) | (j >= w1))[None, None, None], False: (kpos < p + c)[None, None, None]}
        q = (p + self._ar[:s])[:, None]  # [S,1] absolute query positions
        key_abs = torch.where(j < w1, p - n + j, p + j - w1)  # absolute position of every sliding slot
        sl = torch.where(j < w1, j < n, True) & (key_abs <= q) & (key_abs > q - w)
        return {True: sl[None, None], False: (kpos <= q)[None, None]}

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q [B,nh,S,hd], k/v [B,kvh,K,hd] -> [B,nh,S,hd]. Query heads sharing a KV head are folded into the
        query axis (head h uses KV head h // g) so K/V are never repeated."""
        b, nh, s, d = q.shape
        g = nh // k.shape[1]
        qf = q.reshape(b, k.shape[1], g * s, d)
        if mask.shape[-2] > 1:
            mask = mask.repeat(1, 1, g, 1)
        # fused kernels may return a transposed layout: reshape, not view
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=1.0).reshape(b, nh, s, d)

    def _forward(self, state: FastState, mode: str, span: int):
        m, cfg, io = self.model, self.cfg, state.io
        ar = mode == "ar"
        enc = mode == "enc" or ar  # causal passes that write the cache
        ids = io["ar_ids"] if ar else io["canvas"]
        s = ids.shape[1]
        p = state.p
        pos = p + self._ar[:s]
        rope = m.rope(pos[None], m.dtype)
        masks = self._masks(p, span, causal=enc, s=s)
        x = F.embedding(ids, m.embed_tokens.weight) * self._scale
        if not enc:
            x = m.self_conditioning(x, io["soft"])
        last = len(m.layers) - 1
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            cos, sin = rope[at.sliding]
            h = layer.input_layernorm(x)
            if mode == "enc" and i == last:  # only the K/V of the last layer matter to generation (spec §6)
                k, v = at.kv(h, cos, sin)
                self._write(state, i, k, v, pos)
                break
            q, k, v = at.qkv(h, cos, sin)
            kb, vb = self._write(state, i, k, v, pos)
            if not at.sliding:
                kb, vb = kb[:, :, :span], vb[:, :, :span]
            a = self._attend(q, kb, vb, masks[at.sliding])
            if enc and at.sliding:
                self._roll_sliding(state, i, p, s)
            r = x + layer.post_attention_layernorm(at.out(a))
            scalar = m.encoder_layer_scalars[i:i + 1] if enc else layer.layer_scalar
            x = layer.ffn(r, scalar.to(r.dtype))
        if ar:
            return m.logits(x[:, -1])
        if enc:
            return None
        hn = m.norm(x)
        lg = (m.fp8_head(hn) if hasattr(m, "fp8_head") else F.linear(hn, m.embed_tokens.weight)).float()
        cap = cfg.final_logit_softcapping
        torch.mul(torch.tanh_(lg.div_(cap)), cap, out=io["raw"])
        probs = (io["raw"] / io["temp"]).to(m.dtype).softmax(dim=-1, dtype=torch.float32).to(m.dtype)
        emb = m.fp8_soft(probs) if hasattr(m, "fp8_soft") else torch.matmul(probs, m.embed_tokens.weight)
        return emb * self._scale

    def _write(self, state: FastState, i: int, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Put the new K/V where attention reads them: sliding -> slots [W-1, W-1+S) of the extended buffer;
        full -> cache slots [P, P+S) (unused until the commit's encoder pass overwrites them with the same data)."""
        if self.cfg.is_sliding(i):
            w1, s = self.cfg.sliding_cache_len, k.shape[2]
            state.ext_k[i][:, :, w1:w1 + s].copy_(k)
            state.ext_v[i][:, :, w1:w1 + s].copy_(v)
            return state.ext_k[i], state.ext_v[i]
        state.cache.k[i].index_copy_(2, pos, k)
        state.cache.v[i].index_copy_(2, pos, v)
        return state.cache.k[i], state.cache.v[i]

    def _roll_sliding(self, state: FastState, i: int, p: Tensor, s: int) -> None:
        """After a commit: the cache keeps the last min(n+S, W-1) tokens of cached[:n] ⊕ new, in order (spec §6)."""
        w1 = self.cfg.sliding_cache_len
        n = p.clamp(max=w1)
        total = n + s
        keep = total.clamp(max=w1)
        t = self._slots[:w1]
        logical = total - keep + t
        src = torch.where(logical < n, logical, w1 + logical - n)
        src = torch.where(t < keep, src, t).clamp(max=w1 + s - 1)
        for ext in (state.ext_k[i], state.ext_v[i]):
            ext[:, :, :w1] = ext.index_select(2, src)
