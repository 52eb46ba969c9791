"""Fast GPU backend: static-shape denoise/commit passes, CUDA-graph replay, FP8 weights (issue: ≤10 ms/step on H100).

Owns `FastBackend` (the Backend protocol over a `DiffusionGemma`), the static-shape layer pass both graphs run,
and FP8 weight conversion (`quantize_fp8_`, `Fp8Linear`, `Fp8Experts`). Shapes never depend on the prefix length P:
K/V live in fixed buffers and P enters only as a device tensor that builds the masks and RoPE positions. On CPU the
same code runs eagerly (tests); on CUDA the denoise step (and the 256-token commit) is captured once per
(batch, key-span bucket) and replayed. Knows nothing of sampling (dgemma.sampler) or checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.lowp import fp8_quantize_rows
from ..model.modeling import OPS, Attention, DiffusionGemma, Experts, KVCache, fuse_ops, grouped_mm
_NOTES: set[str] = set()


def note(msg: str) -> None:
    """Print a degradation note once per process."""
    if msg not in _NOTES:
        _NOTES.add(msg)
        print(f"[dgemma.fast] {msg}", flush=True)


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


def _fake_quant(x: Tensor) -> Tensor:
    """Dequantised per-token e4m3 copy of x: the CPU fallback sees the same activation rounding as the GPU path."""
    q, s = _quant_rows(x)
    return (q.float() * s).to(x.dtype)


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
        return F.linear(_fake_quant(x2), self.dequant(x.dtype)).reshape(*lead, -1)


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
        deq = (w.to(x.dtype) * s[..., None].to(x.dtype)).transpose(-2, -1)
        return grouped_mm(_fake_quant(x), deq, offs)

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
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
