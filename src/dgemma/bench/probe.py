"""GPU probe for the fast path: step/commit latency, component breakdown, end-to-end tok/s, logit agreement, roofline.

`dgemma probe [--precision bf16|fp8] [--prompt 1024] [--steps 16] [--canvases 4] [--json OUT]`
builds the full-size model with random weights on CUDA (or `--device cpu --tiny` for a seconds-long smoke run),
times eager TorchBackend vs FastBackend (CUDA graphs) with CUDA events, and prints a table + writes JSON.
Owns only measurement; the computation lives in dgemma.runtime.fast.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..core.config import FULL_SIZE, TINY, SamplerConfig
from ..core.stats import percentile
from ..generation.sampler import generate
from ..model.modeling import DiffusionGemma
from ..runtime.base import BackendWrapper
from ..runtime.fast import FastBackend, quantize_fp8_
from ..runtime.torch_backend import TorchBackend


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, reps: int, dev, warmup: int = 1) -> list[float]:
    """ms per call of fn(): CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def agreement(ref: torch.Tensor, got: torch.Tensor) -> dict:
    ref, got = ref.float(), got.float()
    return {"rel_l2": ((ref - got).norm() / ref.norm()).item(),
            "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}


def copy_bandwidth(dev) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if dev.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = statistics.median(timeit(lambda: b.copy_(a), 5, dev))
    return 2 * n / (ms / 1e3)


def step_bytes(model: DiffusionGemma) -> int:
    """Weight bytes one denoise step reads: all layers (every expert at batch 1 x 256 tokens), self-conditioning,
    the LM head and the soft-embedding GEMM (each a full pass over the tied embedding or its fp8 copies)."""
    def nbytes(mod):
        return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))
    emb = model.embed_tokens.weight
    head = (nbytes(model.fp8_head) + nbytes(model.fp8_soft)) if hasattr(model, "fp8_head") else \
        2 * emb.numel() * emb.element_size()
    return nbytes(model.layers) + nbytes(model.self_conditioning) + head


def breakdown(fb: FastBackend, state, dev, reps: int) -> dict:
    """Per-component ms x count, each component timed in isolation on a [B,C,H] activation."""
    m, cfg = fb.model, fb.cfg
    x = torch.randn(state.io["canvas"].shape[0], cfg.canvas_length, cfg.hidden_size, device=dev, dtype=m.dtype)
    span = fb._span(state.cache.length)
    masks = fb._masks(state.p, span, causal=False, s=cfg.canvas_length)
    pos = state.p + fb._ar
    rope = m.rope(pos[None], m.dtype)
    kinds = {True: next(i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)),
             False: next(i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))}

    def attn(i):
        layer = m.layers[i]
        at = layer.self_attn
        cos, sin = rope[at.sliding]
        q, k, v = at.qkv(layer.input_layernorm(x), cos, sin)
        kb, vb = fb._write(state, i, k, v, pos)
        if not at.sliding:
            kb, vb = kb[:, :, :span], vb[:, :, :span]
        return x + layer.post_attention_layernorm(at.out(fb._attend(q, kb, vb, masks[at.sliding])))

    layer = m.layers[0]
    flat = x.reshape(-1, cfg.hidden_size)

    def moe():
        w, idx = layer.router(flat)
        return layer.post_feedforward_layernorm_2(layer.experts(layer.pre_feedforward_layernorm_2(flat), w, idx))

    def head():
        io = state.io
        hn = m.norm(x)
        lg = (m.fp8_head(hn) if hasattr(m, "fp8_head") else F.linear(hn, m.embed_tokens.weight)).float()
        raw = torch.tanh(lg / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        probs = (raw / io["temp"]).to(m.dtype).softmax(-1, dtype=torch.float32).to(m.dtype)
        return m.fp8_soft(probs) if hasattr(m, "fp8_soft") else probs @ m.embed_tokens.weight

    n_sl = sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    comps = {"attn_sliding": (lambda: attn(kinds[True]), n_sl),
             "attn_full": (lambda: attn(kinds[False]), cfg.num_hidden_layers - n_sl),
             "dense_mlp": (lambda: layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(x))),
                           cfg.num_hidden_layers),
             "router_moe": (moe, cfg.num_hidden_layers),
             "self_cond": (lambda: m.self_conditioning(x, x), 1),
             "lm_head_soft_embed": (head, 1)}
    out = {}
    with torch.no_grad():
        for name, (fn, count) in comps.items():
            ms = statistics.median(timeit(fn, reps, dev))
            out[name] = {"ms": ms, "count": count, "total_ms": ms * count}
    return out


def run(args) -> dict:
    dev = torch.device(args.device)
    cfg = TINY if args.tiny else FULL_SIZE
    tiny = args.tiny
    prompt_len = args.prompt or (40 if tiny else 1024)
    steps, canvases = args.steps or (4 if tiny else 16), args.canvases or (2 if tiny else 4)
    reps = args.reps or (3 if tiny else 30)
    c = cfg.canvas_length
    max_ctx = prompt_len + (canvases + 1) * c
    dtype = torch.float32 if (tiny and dev.type == "cpu") else torch.bfloat16
    res: dict = {"config": {"precision": args.precision, "prompt": prompt_len, "steps": steps, "canvases": canvases,
                            "device": str(dev), "tiny": tiny, "dtype": str(dtype), "fp8_lm_head": args.fp8_lm_head,
                            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}}
    t0 = time.perf_counter()
    model = DiffusionGemma.random(cfg, device=dev, dtype=dtype, seed=0)
    _sync(dev)
    res["init_s"] = time.perf_counter() - t0
    gen = torch.Generator(device=dev).manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), device=dev, generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (1, c), device=dev, generator=gen)
    temp = torch.tensor(0.6, device=dev)

    # (i) eager baseline + reference logits (bf16 weights, before any quantisation)
    tb = TorchBackend(model, max_ctx)
    st = tb.new_state(1)
    tb.encode(st, prompt)
    ref_raw, ref_soft = tb.denoise(st, canvas, None, temp)
    ref2, _ = tb.denoise(st, canvas, ref_soft, temp)
    ref_raw, ref2 = ref_raw.clone(), ref2.clone()
    eager = timeit(lambda: tb.denoise(st, canvas, ref_soft, temp), max(2, min(reps, 5)), dev)
    res["eager_step_ms"] = statistics.median(eager)
    del st, tb
    if args.precision == "fp8":
        t0 = time.perf_counter()
        quantize_fp8_(model, fp8_lm_head=args.fp8_lm_head)
        _sync(dev)
        res["quantize_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # (ii) fast step, (vi) agreement
    fb = FastBackend(model, max_ctx)
    fs = fb.new_state(1)
    fb.encode(fs, prompt)
    raw, soft = fb.denoise(fs, canvas, None, temp)
    a1 = agreement(ref_raw, raw)
    raw, _ = fb.denoise(fs, canvas, ref_soft, temp)  # captured now; this one replays
    res["agreement"] = {"step1": a1, "step2_same_soft": agreement(ref2, raw)}
    fast = timeit(lambda: fb.denoise(fs, canvas, ref_soft, temp), reps, dev, warmup=2)
    res["fast_step_ms_p50"], res["fast_step_ms_p99"] = percentile(fast, 50), percentile(fast, 99)
    res["graphs"] = fb.use_graphs

    # (iii) commit of one canvas at P = prompt (length reset each rep: same span bucket, graph replay)
    def commit():
        fb.encode(fs, canvas)
        fs.cache.length = prompt_len
    res["commit_ms"] = statistics.median(timeit(commit, max(3, reps // 3), dev, warmup=2))

    # (iv) breakdown
    bd = breakdown(fb, fs, dev, max(3, reps // 3))
    res["breakdown"] = bd
    res["breakdown_sum_ms"] = sum(v["total_ms"] for v in bd.values())

    # roofline
    bw = copy_bandwidth(dev)
    nb = step_bytes(model)
    res["roofline"] = {"weight_bytes": nb, "copy_bw_GBs": bw / 1e9, "floor_ms": nb / bw * 1e3}

    # (v) end-to-end generate (prefill excluded: clock from the first denoise to the last commit)
    scfg = SamplerConfig(max_new_tokens=canvases * c, max_denoising_steps=steps, adaptive_stopping=False,
                         ignore_eos=True)
    marks = {}

    class Clocked(BackendWrapper):
        def denoise(self, s, cv, sf, t):
            if "start" not in marks:
                marks["start"] = _mark(dev)
            return self.inner.denoise(s, cv, sf, t)

    def on_canvas(i, committed):
        if i == canvases - 1:
            marks["end"] = _mark(dev)

    generate(fb, prompt, scfg, torch.Generator(device=dev).manual_seed(1))  # warm-up: capture every span bucket
    out = generate(Clocked(fb), prompt, scfg, torch.Generator(device=dev).manual_seed(1), on_canvas=on_canvas)
    _sync(dev)
    ms = _elapsed(marks["start"], marks["end"], dev)
    toks = out.new_tokens.numel()
    res["e2e"] = {"tokens": toks, "ms": ms, "tok_s": toks / (ms / 1e3), "ms_per_step": ms / (canvases * steps)}
    return res


def _mark(dev):
    if dev.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _elapsed(a, b, dev) -> float:
    return a.elapsed_time(b) if dev.type == "cuda" else (b - a) * 1e3


def table(res: dict) -> str:
    r = res
    rows = [("precision", r["config"]["precision"]), ("eager step ms", f"{r['eager_step_ms']:.2f}"),
            ("fast step ms p50/p99", f"{r['fast_step_ms_p50']:.2f} / {r['fast_step_ms_p99']:.2f}"),
            ("cuda graphs", r["graphs"]), ("commit ms", f"{r['commit_ms']:.2f}"),
            ("roofline floor ms", f"{r['roofline']['floor_ms']:.2f} ({r['roofline']['weight_bytes'] / 1e9:.2f} GB @ "
                                  f"{r['roofline']['copy_bw_GBs']:.0f} GB/s)"),
            ("e2e tok/s", f"{r['e2e']['tok_s']:.0f} ({r['e2e']['ms_per_step']:.2f} ms/step incl. sampler)"),
            ("agreement step1", f"rel {r['agreement']['step1']['rel_l2']:.4f} top1 {r['agreement']['step1']['top1']:.3f}"),
            ("agreement step2", f"rel {r['agreement']['step2_same_soft']['rel_l2']:.4f} "
                                f"top1 {r['agreement']['step2_same_soft']['top1']:.3f}")]
    for k, v in r["breakdown"].items():
        rows.append((f"  {k} x{v['count']}", f"{v['ms']:.3f} -> {v['total_ms']:.2f}"))
    rows.append(("  breakdown sum vs step", f"{r['breakdown_sum_ms']:.2f} vs {r['fast_step_ms_p50']:.2f}"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
