"""The fast backend's state and passes: `FastState` (fixed KV buffers of one batch) and `FastBackend` (the Backend
protocol over a DiffusionGemma with static shapes, CUDA-graph replay and the fused kernels chosen by
runtime.fast.policy).

Shapes never depend on the prefix length P: K/V live in fixed buffers and P enters only as a device tensor that
builds the masks and RoPE positions. On CPU the same code runs eagerly (tests); on CUDA each pass (denoise step,
256-token commit, prefill chunk, AR step) is captured once per (mode, length, key-span bucket) and replayed. The
layers run either the torch pass below or the fused kernel pass (runtime.fast.fused). Knows nothing of sampling.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import ConfigError
from ...model.modeling import DiffusionGemma, KVCache
from .fp8 import enable_fusion
from .fused import FusedLayers, Unsupported
from .nvfp4 import describe_footprint, footprint, log
from .policy import Kernels, k_attention, k_sampler, note

CATEGORIES = ("moe", "dense_gemm", "attention", "head", "other")  # profile_step's sections


@dataclass
class FastState:
    """KV state of one batch: the native KVCache plus the denoiser's extended sliding buffers [B,kvh,W-1+C,hd]
    whose first W-1 slots *are* the cache's sliding tensors (views), P on the device (int64 [1] for the masks,
    int32 [B] for the QKV kernel) and the fused pass's per-length K/V scratch of full layers."""
    cache: KVCache
    ext_k: dict[int, Tensor]
    ext_v: dict[int, Tensor]
    p: Tensor  # int64 [1]: P on the device (graphs read it)
    past32: Tensor  # int32 [B]: the same P per row (kernels.qkv reads it)
    graphs: dict = field(default_factory=dict)
    io: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)  # (layer, S) -> (K, V) [B, kvh, S, hd]
    samplers: dict = field(default_factory=dict)  # fused sampler's configuration -> its SamplerState (one per batch)
    sampler: tuple | None = None  # (FusedSampler, SamplerState) that the "step" pass runs

    @property
    def length(self) -> int:
        return self.cache.length

    def new_kv(self, i: int, s: int) -> tuple[Tensor, Tensor]:
        """Static K/V buffers of full layer i for an S-token pass (allocated once: graph-stable addresses)."""
        key = (i, s)
        if key not in self.scratch:
            b, h, _, d = self.cache.k[i].shape
            z = self.cache.k[i].new_zeros(b, h, s, d)
            self.scratch[key] = (z, torch.zeros_like(z))
        return self.scratch[key]


class _Clock:
    """profile_step's section timer: CUDA events (no host sync until the end) or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        a = self._mark()
        yield
        self.marks.append((name, a, self._mark()))

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = dict.fromkeys(CATEGORIES, 0.0)
        for name, a, b in self.marks:
            out[name] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def _no_clock(name: str):
    return contextlib.nullcontext()


def _sampler_key(fs) -> tuple:
    """What a captured sampler step bakes in besides buffer addresses: the head weights and the scalar settings."""
    return (id(fs.w), fs.c, fs.softcap, fs.bound, fs.k, fs.threshold, fs.adaptive)


class FastBackend:
    """Backend protocol over a DiffusionGemma with static shapes, CUDA graphs and fused kernels.

    KV buffers are owned per batch size: `new_state(b)` resets and returns the same buffers each time, so only one
    live state per batch size (graphs hold their addresses). `denoise` returns raw logits as a view of a static
    buffer, overwritten by the next denoise of that state: consume or clone it before the next call (the sampler
    does); next_soft is returned as a fresh tensor because the sampler keeps the previous one.

    kernels: "auto" (the fused kernels on a CUDA device when triton imports), "off" (torch ops only) or "force"
    (kernels everywhere; CPU tensors run them under the Triton interpreter). Per op (`self.kernels.summary()`):
    moe = the expert modules' kernel, attention = kernels.attention in the torch layer pass, dense = the whole
    layer pass on the fused kernels (needs bf16 activations and FP8 dense weights, i.e. quantize_fp8_ or an NVFP4
    checkpoint; it brings its own attention), head = the fused LM head + sampler of dgemma.generation.fused (never
    `denoise`, whose logits the reference sampler needs).
    """

    def __init__(self, model: DiffusionGemma, max_context: int | None = None, cuda_graphs: bool = True,
                 key_bucket: int = 512, static_commit: bool = True, fuse: bool | None = None,
                 kernels: str = "auto", static_prefill: bool = True):
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
        self.key_bucket, self.static_commit, self.static_prefill = key_bucket, static_commit, static_prefill
        self.footprint = footprint(model)  # weight bytes by category (before the fused pass shares its views)
        log.info("weights: %s", describe_footprint(self.footprint))
        self.kernels = Kernels.resolve(kernels, self.device)
        self._claim()  # Fp8Experts / Nvfp4Experts consult the policy of the backend that runs them
        self.fused: FusedLayers | None = None
        if self.kernels.use("dense"):
            try:
                self.fused = FusedLayers(model)
            except Unsupported as e:
                self.kernels.disable("dense", str(e))
        self._head_weights = None
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
            st = FastState(cache, ext_k, ext_v, torch.zeros(1, dtype=torch.int64, device=self.device),
                           torch.zeros(batch, dtype=torch.int32, device=self.device))
            h, dev = self.cfg.hidden_size, self.device
            st.io = dict(canvas=torch.zeros(batch, c, dtype=torch.int64, device=dev),
                         soft=torch.zeros(batch, c, h, dtype=self.model.dtype, device=dev),
                         temp=torch.ones((), dtype=torch.float32, device=dev),
                         ar_ids=torch.zeros(batch, 1, dtype=torch.int64, device=dev),
                         raw=torch.zeros(batch, c, self.vocab_size, dtype=torch.float32, device=dev))
            self._states[batch] = st
        st.cache.length = 0
        return st

    def length(self, state: FastState) -> int:
        return state.cache.length

    @torch.no_grad()
    def encode(self, state: FastState, ids: Tensor) -> None:
        """Commit (S = C at P > 0) through the static pass; a prefill in static C-token chunks (the same causal
        arithmetic chunk by chunk: the cache holds everything a later chunk's queries see), its tail (< C tokens)
        through the native eager pass."""
        self._claim()
        p, s, c = state.cache.length, ids.shape[1], self.canvas_length
        state.cache.check_room(s)
        static = self.static_commit and s == c and p > 0
        chunks = (s // c) if (self.static_prefill and not static) else (1 if static else 0)
        for j in range(chunks):
            state.io["canvas"].copy_(ids[:, j * c:(j + 1) * c])
            self._run(state, "enc", state.cache.length)
            state.cache.length += c
        if chunks * c < s:
            self.model.encode(ids[:, chunks * c:], state.cache)  # the tail; shapes depend on P anyway

    @torch.no_grad()
    def denoise(self, state: FastState, canvas: Tensor, soft: Tensor | None, temperature: Tensor):
        self._inputs(state, canvas, soft, temperature)
        nxt = self._run(state, "den", state.cache.length)
        return state.io["raw"], nxt.clone()

    @torch.no_grad()
    def denoise_hidden(self, state: FastState, canvas: Tensor, soft: Tensor | None) -> Tensor:
        """The denoiser up to the final norm: normed hidden states [B,C,H] (a static buffer, overwritten by the next
        call) for a fused LM head + sampler (dgemma.generation.fused); no logits are formed."""
        self._inputs(state, canvas, soft, None)
        return self._run(state, "hid", state.cache.length)

    def sampler_state(self, state: FastState, fs, seeds) -> object:
        """The fused sampler's device state for this batch (kernels.fused_sampler.SamplerState): allocated once per
        FastState and sampler configuration, then reset to `seeds`, so the step graphs that hold its addresses
        stay valid from one generation to the next."""
        key = _sampler_key(fs)
        st = state.samplers.get(key)
        if st is None:
            st = state.samplers[key] = fs.new_state(state.past32.shape[0], seeds)
        else:
            st.rng[:, 0].copy_(torch.as_tensor(list(seeds), dtype=torch.int64))
            st.rng[:, 1].zero_()
        return st

    @torch.no_grad()
    def sampler_step(self, state: FastState, fs, st, temperature: Tensor):
        """One whole denoising step with the fused LM head + sampler: the denoiser reads st's canvas and soft
        embedding, fs.step writes the next ones (kernels.fused_sampler). On CUDA the pass and the sampler are one
        CUDA graph per (key span, sampler configuration, sampler state); the temperature (0-d) enters through a
        static device scalar. Returns fs.step's StepResult (views of st's buffers, overwritten by the next step)."""
        state.cache.check_room(self.canvas_length)
        state.io["temp"].copy_(temperature)
        state.sampler = (fs, st)
        return self._run(state, "step", state.cache.length, (_sampler_key(fs), st.canvas.data_ptr(),
                                                             None if st.template is None else st.template.data_ptr()))

    @torch.no_grad()
    def ar_step(self, state: FastState, ids: Tensor) -> Tensor:
        """Autoregressive baseline on the same weights: causal pass over ids [B,S] -> next-token logits [B,V].
        S > 1 (the prompt) runs eagerly; S == 1 is a captured graph like the denoise step."""
        self._claim()
        p = state.cache.length
        if ids.shape[1] != 1:
            return self.model.encode(ids, state.cache, last_logits=True)
        state.cache.check_room(1)
        state.io["ar_ids"].copy_(ids)
        out = self._run(state, "ar", p)
        state.cache.length = p + 1
        return out

    def fused_sampler(self, sampler_cfg):
        """The fused LM head + sampler over this model's tied embedding (its FP8 copies when quantize_fp8_ made them):
        a kernels.fused_sampler.FusedSampler for dgemma.generation.fused. Needs the `head` op (kernels on)."""
        if not self.kernels.use("head"):
            raise ConfigError(f"the fused sampler needs the head kernels: {self.kernels.why.get('head')}")
        m = self.model
        if self._head_weights is None:
            if hasattr(m, "fp8_head"):
                self._head_weights = k_sampler.HeadWeights(m.embed_tokens.weight.contiguous(), m.fp8_head.weight,
                                                           m.fp8_head.scale, m.fp8_soft.weight, m.fp8_soft.scale)
            else:
                self._head_weights = k_sampler.HeadWeights(m.embed_tokens.weight.contiguous())
        return k_sampler.FusedSampler.from_configs(self._head_weights, self.cfg, sampler_cfg)

    # -- measurement -------------------------------------------------------------------------------------------
    def rewind(self, state: FastState, length: int) -> None:
        """Set the cached length back (benchmarks repeating a commit at the same P): full layers ignore the slots
        past it; sliding buffers keep what the rolls left, so what follows is timing, not the model's output."""
        state.cache.length = length

    @torch.no_grad()
    def profile_step(self, state: FastState, canvas: Tensor, soft: Tensor | None, temperature: Tensor,
                     mode: str = "den") -> dict[str, float]:
        """One eager (uncaptured) pass with every section timed: ms per category of CATEGORIES (moe: routed
        experts; dense_gemm: q/k/v/o, dense MLP and self-conditioning projections with their fused epilogues;
        attention; head: LM head, softcap and soft embedding; other: embedding, norms, residuals, router, RoPE
        tables, cache writes). mode "enc" times a commit of `canvas` at the current length (its
        length and sliding buffers are restored afterwards)."""
        p = state.cache.length
        self._claim()
        self._inputs(state, canvas, soft, temperature)
        state.p.fill_(p)
        state.past32.fill_(p)
        saved = [t.clone() for i in state.ext_k for t in (state.ext_k[i], state.ext_v[i])] if mode == "enc" else []
        clock = _Clock(self.device)
        self._forward(state, mode, self._span(p), clock)
        res = clock.totals()
        for t, src in zip([t for i in state.ext_k for t in (state.ext_k[i], state.ext_v[i])], saved):
            t.copy_(src)
        return res

    # -- graph management --------------------------------------------------------------------------------------
    def _inputs(self, state: FastState, canvas: Tensor, soft: Tensor | None, temperature: Tensor | None) -> None:
        state.cache.check_room(self.canvas_length)
        io = state.io
        io["canvas"].copy_(canvas)
        if soft is None:
            io["soft"].zero_()
        else:
            io["soft"].copy_(soft)
        if temperature is not None:
            io["temp"].copy_(temperature)

    def _span(self, p: int) -> int:
        need = p + self.canvas_length + 1
        return min(self.max_context, -(-need // self.key_bucket) * self.key_bucket)

    def _claim(self) -> None:
        """Point the model's expert modules at this backend's policy (several backends may share one model)."""
        owner = getattr(self.model, "_fast_owner", None)
        if owner is None or owner() is not self:
            for mod in self.model.modules():
                if "kernels" in type(mod).__dict__:
                    mod.kernels = self.kernels
            self.model._fast_owner = weakref.ref(self)  # a weak reference: deepcopy of the model copies no backend

    def _run(self, state: FastState, mode: str, p: int, key_extra: tuple = ()):
        self._claim()
        state.p.fill_(p)  # kernels with a scalar argument: no host sync
        state.past32.fill_(p)
        span = self._span(p)
        if not self.use_graphs:
            return self._forward(state, mode, span)
        key = (mode, span, *key_extra)
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

    def _forward(self, state: FastState, mode: str, span: int, clock: Callable = _no_clock):
        """mode: den (logits + next soft), hid (normed hidden), step (hid + the fused sampler's step on
        state.sampler), enc (commit / prefill chunk), ar (S = 1)."""
        m, io = self.model, state.io
        if mode == "step":  # the sampler state's canvas and soft embedding are the pass's inputs
            io["canvas"].copy_(state.sampler[1].canvas)
            io["soft"].copy_(state.sampler[1].soft)
        ar = mode == "ar"
        enc = mode == "enc" or ar  # causal passes that write the cache
        ids = io["ar_ids"] if ar else io["canvas"]
        s = ids.shape[1]
        with clock("other"):
            x = F.embedding(ids, m.embed_tokens.weight) * self._scale
        if not enc:
            with clock("dense_gemm"):
                x = m.self_conditioning(x, io["soft"])
        x, hn = self.kernels.run("dense", lambda: self.fused.forward(self, state, mode, x, clock),
                                 lambda: self._layers_torch(state, mode, span, x, clock))
        if enc:
            with clock("other"):  # deferred to the end: a pass that fails midway leaves nothing half-rolled
                for i in state.ext_k:
                    self._roll_sliding(state, i, state.p, s)
        if mode == "enc":
            return None
        with clock("head"):
            if ar:
                return self._logits(hn[:, -1])
            if mode == "hid":
                return hn
            if mode == "step":
                fs, st = state.sampler
                return fs.step(st, hn, io["temp"])
            self._logits(hn, out=io["raw"])
            probs = (io["raw"] / io["temp"]).to(m.dtype).softmax(dim=-1, dtype=torch.float32).to(m.dtype)
            emb = m.fp8_soft(probs) if hasattr(m, "fp8_soft") else torch.matmul(probs, m.embed_tokens.weight)
            return emb * self._scale

    def _logits(self, hn: Tensor, out: Tensor | None = None) -> Tensor:
        """model.logits after the final norm (the FP8 head copy when quantize_fp8_ made one)."""
        m = self.model
        lg = (m.fp8_head(hn) if hasattr(m, "fp8_head") else F.linear(hn, m.embed_tokens.weight)).float()
        cap = self.cfg.final_logit_softcapping
        return torch.mul(torch.tanh_(lg.div_(cap)), cap, out=out)

    def _layers_torch(self, state: FastState, mode: str, span: int, x: Tensor, clock: Callable):
        """The layers with torch ops (FP8 linears, the expert module, SDPA or kernels.attention per the policy)
        -> (residual stream, final-normed hidden or None for enc)."""
        m, cfg = self.model, self.cfg
        enc = mode in ("enc", "ar")
        s = x.shape[1]
        p = state.p
        with clock("other"):
            pos = p + self._ar[:s]
            rope = m.rope(pos[None], m.dtype)
            masks = None if self.kernels.use("attention") else self._masks(p, span, causal=enc, s=s)
        last = len(m.layers) - 1
        w1 = cfg.sliding_cache_len
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            cos, sin = rope[at.sliding]
            with clock("other"):
                h = layer.input_layernorm(x)
            if mode == "enc" and i == last:  # only the K/V of the last layer matter to generation (spec §6)
                with clock("dense_gemm"):
                    k, v = at.kv(h, cos, sin)
                with clock("other"):
                    self._write(state, i, k, v, pos)
                break
            with clock("dense_gemm"):
                q, k, v = at.qkv(h, cos, sin)
            with clock("other"):
                kb, vb = self._write(state, i, k, v, pos)
            with clock("attention"):
                if masks is None:
                    def kernel(i=i, q=q, k=k, v=v, kb=kb, vb=vb, sliding=at.sliding):
                        if sliding:
                            return k_attention.attention(q, kb[:, :, :w1], vb[:, :, :w1], kb[:, :, w1:w1 + s],
                                                         vb[:, :, w1:w1 + s], p, enc, cfg.sliding_window)
                        return k_attention.attention(q, kb, vb, k, v, p, enc, None)
                    a = self.kernels.run("attention", kernel, lambda: self._attend_masked(
                        q, kb, vb, at.sliding, p, span, enc, s))
                else:
                    a = self._attend_masked(q, kb, vb, at.sliding, p, span, enc, s, masks)
            with clock("dense_gemm"):
                o = at.out(a)
            with clock("other"):
                r = x + layer.post_attention_layernorm(o)
                scalar = (m.encoder_layer_scalars[i:i + 1] if enc else layer.layer_scalar).to(r.dtype)
            x = self._ffn_torch(layer, r, scalar, clock)
        if mode == "enc":
            return x, None
        with clock("other"):
            return x, m.norm(x)

    def _attend_masked(self, q, kb, vb, sliding, p, span, enc, s, masks=None):
        if masks is None:
            masks = self._masks(p, span, causal=enc, s=s)
        if not sliding:
            kb, vb = kb[:, :, :span], vb[:, :, :span]
        return self._attend(q, kb, vb, masks[sliding])

    @staticmethod
    def _ffn_torch(layer, r: Tensor, scalar: Tensor, clock: Callable) -> Tensor:
        """model.Layer.ffn with its sections timed (same ops, same order)."""
        with clock("other"):
            a = layer.pre_feedforward_layernorm(r)
        with clock("dense_gemm"):
            m1 = layer.mlp(a)
        with clock("other"):
            h1 = layer.post_feedforward_layernorm_1(m1)
            flat = r.reshape(-1, r.shape[-1])
            w, idx = layer.router(flat)
            b = layer.pre_feedforward_layernorm_2(flat)
        with clock("moe"):
            e = layer.experts(b, w, idx)
        with clock("other"):
            h2 = layer.post_feedforward_layernorm_2(e.reshape(r.shape))
            return (r + layer.post_feedforward_layernorm(h1 + h2)) * scalar

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
