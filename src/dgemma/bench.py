"""Benchmarks: scenarios from bench/scenarios/*.toml run through any Backend, metrics derived from a
timing trace, the AR baseline of the same backbone, and the memory roofline of a denoising step.

Metric definitions follow the published anchors (anchors.md §1, §3.2): generation tok/s = committed
tokens / (first denoising step -> last commit), prefill excluded. The arithmetic lives in pure
functions (`derive`, `roofline`) so it is tested on synthetic traces. Knows nothing of Triton.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import ModelConfig, SamplerConfig
from .errors import ConfigError
from .profiles import GpuProfile, Precision
from .runtime.base import BackendWrapper
from .sampler import generate

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "bench" / "scenarios"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    batch: int = 1
    prompt_tokens: int = 1024
    max_new_tokens: int = 1024
    steps: int = 48
    adaptive: bool = True
    ignore_eos: bool = False
    repeats: int = 1
    warmup: int = 1
    ar_baseline: bool = False
    ar_tokens: int = 128
    batches: tuple[int, ...] = ()  # concurrency sweep: batch sizes in-process, concurrent requests through Triton
    rounds: int = 2  # Triton sweep: each concurrency level sends level x rounds requests
    prompt_sweep: tuple[int, ...] = ()  # long-context sweep

    @classmethod
    def load(cls, name_or_path: str) -> "Scenario":
        p = Path(name_or_path)
        if not p.suffix:
            p = SCENARIO_DIR / f"{name_or_path}.toml"
        if not p.exists():
            known = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.toml")))
            raise ConfigError(f"scenario {name_or_path!r} not found ({p}); known: {known}.")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e}).") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}.")
        for k in ("batches", "prompt_sweep"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)

    def fit(self, gpu: GpuProfile, cfg: ModelConfig, served: bool = False) -> "Scenario":
        """Clamp to the profile (the `cpu` profile runs every scenario in a reduced form on the tiny model).

        In-process batches stop at GpuProfile.max_batch (KV buffers, engine profile). Served (Triton), the levels
        are concurrent requests and go to 4 x max_batch: past max_batch requests queue, so the top levels show
        where throughput saturates and latency starts to grow."""
        prompt = min(self.prompt_tokens, gpu.max_prompt)
        room = gpu.max_context - prompt
        new = max(cfg.canvas_length, min(self.max_new_tokens, (room // cfg.canvas_length) * cfg.canvas_length))
        limit = 4 * gpu.max_batch if served else gpu.max_batch
        kw = dict(prompt_tokens=prompt, max_new_tokens=new,
                  batches=tuple(b for b in self.batches if b <= limit),
                  prompt_sweep=tuple(p for p in self.prompt_sweep if p + cfg.canvas_length <= gpu.max_context))
        if gpu.sm == 0 and self.prompt_sweep:  # CPU: the same sweep shape, scaled to the profile's prompt limit
            kw["prompt_sweep"] = (gpu.max_prompt // 4, gpu.max_prompt // 2, gpu.max_prompt)
        if gpu.sm == 0:  # CPU: seconds, not minutes
            kw.update(repeats=1, warmup=0, ar_tokens=min(self.ar_tokens, 8), steps=min(self.steps, 8),
                      rounds=min(self.rounds, 2),
                      batches=kw["batches"] if served else tuple(b for b in kw["batches"] if b <= 2)[:2])
        return replace(self, **kw)

    def sampler(self, base: SamplerConfig) -> SamplerConfig:
        return base.replace(max_new_tokens=self.max_new_tokens, max_denoising_steps=self.steps,
                            adaptive_stopping=self.adaptive, ignore_eos=self.ignore_eos)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def derive(trace: list[dict], committed_tokens: int, batch: int = 1) -> dict:
    """Metrics of one request from its trace of {"kind", "t0", "t1"} events (seconds).

    kinds: prefill, denoise (backend call), step (denoise start -> sampler done), commit, canvas (t1 only).
    """
    def of(kind):
        return [e for e in trace if e["kind"] == kind]

    prefill, steps, denoise, commits, canvases = of("prefill"), of("step"), of("denoise"), of("commit"), of("canvas")
    t_start = prefill[0]["t0"]
    t_first_step = steps[0]["t0"]
    t_end = canvases[-1]["t1"]
    gen_s = t_end - t_first_step
    ms = lambda evs: [1e3 * (e["t1"] - e["t0"]) for e in evs]  # noqa: E731
    step_ms, den_ms, com_ms = ms(steps), ms(denoise), ms(commits)
    per_canvas, cur = [], 0
    for e in trace:  # steps between canvas events
        if e["kind"] == "step":
            cur += 1
        elif e["kind"] == "canvas":
            per_canvas.append(cur)
            cur = 0
    later = sum(per_canvas[1:])  # steps after the first canvas: the inter-canvas time per step (Triton's view)
    inter = 1e3 * (canvases[-1]["t1"] - canvases[0]["t1"]) / later if len(canvases) > 1 and later else None
    return {
        "committed_tokens": committed_tokens,
        "batch": batch,
        "generation_s": gen_s,
        "e2e_s": t_end - t_start,
        "generation_tok_s": committed_tokens / gen_s,
        "e2e_tok_s": committed_tokens / (t_end - t_start),
        "prefill_ms": 1e3 * (prefill[0]["t1"] - prefill[0]["t0"]),
        "time_to_first_canvas_ms": 1e3 * (canvases[0]["t1"] - t_start),
        "step_ms_p50": percentile(step_ms, 50),
        "step_ms_p99": percentile(step_ms, 99),
        "step_ms_mean": statistics.fmean(step_ms),
        "denoise_ms_p50": percentile(den_ms, 50),
        "denoise_ms_p99": percentile(den_ms, 99),
        "commit_ms_mean": statistics.fmean(com_ms) if com_ms else None,
        "canvases": len(canvases),
        "steps_per_canvas": per_canvas,
        "mean_steps_per_canvas": statistics.fmean(per_canvas),
        "tokens_per_forward": committed_tokens / batch / len(steps),
        "inter_canvas_ms_per_step": inter,
        "step_latencies_ms": [round(x, 4) for x in step_ms],
    }


def roofline(cfg: ModelConfig, precision: Precision, prefix: int, hbm_gbs: float, batch: int = 1,
             lm_head_bytes: float = 2.0) -> dict:
    """Fewest bytes one denoising step must move, and the step floor at the given bandwidth.

    Weights: every linear at the precision; with C*B*top_k >> experts every expert is read (the expected
    fraction touched is reported); embedding read twice at 16 bit (LM head, soft embedding). KV: the
    cached prefix of every layer. Logits: written once and read once in fp32 by the sampler.
    """
    wb = precision.weight_bytes
    h, c, v = cfg.hidden_size, cfg.canvas_length, cfg.vocab_size
    touched = 1 - (1 - cfg.top_k_experts / cfg.num_experts) ** (c * batch)
    experts = attn = dense = 0
    for i in range(cfg.num_hidden_layers):
        hd, kvh = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        attn += h * cfg.num_attention_heads * hd * 2 + h * kvh * hd * (2 if cfg.is_sliding(i) else 1)
        dense += 3 * h * cfg.intermediate_size + h * cfg.num_experts
        experts += cfg.num_experts * 3 * h * cfg.moe_intermediate_size * touched
    dense += 3 * h * cfg.intermediate_size  # self-conditioning MLP
    kv = 0
    for i in range(cfg.num_hidden_layers):
        n = min(prefix, cfg.sliding_cache_len) if cfg.is_sliding(i) else prefix
        kv += 2 * batch * n * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * 2
    parts = {
        "attention_weights": attn * wb,
        "dense_mlp_router_weights": dense * wb,
        "expert_weights": experts * wb,
        "embedding_lm_head_and_soft_embed": 2 * v * h * lm_head_bytes,
        "kv_cache": kv,
        "logits_fp32_write_read": 2 * batch * c * v * 4,
    }
    total = sum(parts.values())
    floor_ms = total / (hbm_gbs * 1e9) * 1e3 if hbm_gbs else float("nan")
    return {
        "bytes": {k: round(x) for k, x in parts.items()},
        "total_gb": total / 1e9,
        "experts_touched_fraction": touched,
        "hbm_gbs": hbm_gbs,
        "step_floor_ms": floor_ms,
        "ceiling_tok_s_at_16_steps": batch * c / (16 * floor_ms / 1e3) if hbm_gbs else float("nan"),
    }


class TimedBackend(BackendWrapper):
    """Wraps a Backend and records a timing trace (synchronising the device around each call)."""

    def __init__(self, inner, trace: list[dict], pad_token_id: int | None = None):
        super().__init__(inner)
        self.trace = trace
        self.pad = pad_token_id
        self._encodes = 0
        self._step_t0 = None

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def new_state(self, batch):
        self._encodes = 0
        return self.inner.new_state(batch)

    def encode(self, state, ids):
        t0 = self._now()
        self.inner.encode(state, ids)
        self.trace.append({"kind": "prefill" if self._encodes == 0 else "commit", "t0": t0, "t1": self._now()})
        self._encodes += 1

    def denoise(self, state, canvas, soft, temperature):
        t0 = self._now()
        out = self.inner.denoise(state, canvas, soft, temperature)
        self.trace.append({"kind": "denoise", "t0": t0, "t1": self._now()})
        self._step_t0 = t0
        return out

    def step_done(self, _event):
        self.trace.append({"kind": "step", "t0": self._step_t0, "t1": self._now()})

    def canvas_done(self, _i, committed):
        n = None if self.pad is None else int((committed != self.pad).sum())  # committed non-pad tokens
        self.trace.append({"kind": "canvas", "t0": None, "t1": self._now(), "tokens": n})


def random_prompt(batch: int, length: int, vocab: int, seed: int, device) -> torch.Tensor:
    """Uniform random token ids (the vLLM anchor's workload), avoiding the special-token block."""
    g = torch.Generator().manual_seed(seed)
    lo = min(256, vocab // 2)
    return torch.randint(lo, vocab, (batch, length), generator=g).to(device)


def run_generation(backend, prompt, sampler: SamplerConfig, seed: int, progress=None, return_result=False):
    """One timed generation -> derived metrics (and the GenerateResult when return_result)."""
    trace: list[dict] = []
    tb = TimedBackend(backend, trace, sampler.pad_token_id)
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)

    def on_step(ev):
        tb.step_done(ev)
        if progress:
            progress(ev, trace)

    res = generate(tb, prompt, sampler, torch.Generator(device=backend.device).manual_seed(seed),
                   on_step=on_step, on_canvas=tb.canvas_done)
    committed = int((res.new_tokens != sampler.pad_token_id).sum())
    m = derive(trace, committed, prompt.shape[0])
    m["tokens_per_forward_sampler"] = float(res.tokens_per_forward.float().mean())
    if backend.device.type == "cuda":
        m["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(backend.device) / 1024**3
    return (m, res) if return_result else m


def run_ar_baseline(backend, prompt, tokens: int) -> dict:
    """Greedy causal decoding, one token per encoder pass, on the same backend: tok/s excluding prefill."""
    if not hasattr(backend, "ar_step"):
        return {"available": False, "reason": f"{type(backend).__name__} has no ar_step"}
    state = backend.new_state(prompt.shape[0])
    sync = (lambda: torch.cuda.synchronize(backend.device)) if backend.device.type == "cuda" else (lambda: None)
    logits = backend.ar_step(state, prompt)
    for _ in range(3):  # warm-up: compilation / graph capture of the one-token step stay out of the timing
        logits = backend.ar_step(state, logits.argmax(-1, keepdim=True))
    sync()
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = backend.ar_step(state, logits.argmax(-1, keepdim=True))
    sync()
    dt = time.perf_counter() - t0
    return {"available": True, "tokens": tokens, "tok_s": tokens * prompt.shape[0] / dt,
            "ms_per_token": 1e3 * dt / tokens}


SUMMARY_KEYS = ("generation_tok_s", "e2e_tok_s", "time_to_first_canvas_ms", "step_ms_p50", "step_ms_p99",
                "denoise_ms_p50", "commit_ms_mean", "prefill_ms", "mean_steps_per_canvas", "tokens_per_forward")


def summarize(runs: list[dict]) -> dict:
    """Median over runs of every summary metric; a metric no run observed is None."""
    out = {}
    for k in SUMMARY_KEYS:
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(xs) if xs else None
    return out


def console_progress(scenario: str, every_s: float = 0.2):
    """on_step hook printing, at most every `every_s`, one stderr line: scenario, canvas/step, ms per step and
    the running generation tok/s (committed non-pad tokens so far / time since the first step)."""
    last = [0.0]

    def show(ev, trace):
        now = trace[-1]["t1"]
        if now - last[0] < every_s:
            return
        last[0] = now
        steps = [e for e in trace if e["kind"] == "step"]
        tokens = sum(e.get("tokens") or 0 for e in trace if e["kind"] == "canvas")
        el = now - steps[0]["t0"]
        print(f"\r  [{scenario}] canvas {ev.canvas + 1} step {ev.step:2d} | {1e3 * el / len(steps):7.2f} ms/step | "
              f"running {tokens / el:9.1f} tok/s", end="", file=sys.stderr, flush=True)
    return show


def run_scenario(backend, cfg: ModelConfig, base: SamplerConfig, sc: Scenario, seed: int = 0,
                 progress: bool = True) -> dict:
    """All measurements of one scenario on one backend -> result dict (metrics + sub-runs)."""
    sampler = sc.sampler(base)
    prog = console_progress(sc.name) if progress else None
    out: dict = {"runs": []}
    dev = backend.device
    for w in range(sc.warmup):
        run_generation(backend, random_prompt(sc.batch, sc.prompt_tokens, cfg.vocab_size, seed + 1000 + w, dev),
                       sampler.replace(max_new_tokens=cfg.canvas_length), seed)
    for r in range(sc.repeats):
        prompt = random_prompt(sc.batch, sc.prompt_tokens, cfg.vocab_size, seed + r, dev)
        out["runs"].append(run_generation(backend, prompt, sampler, seed + r, prog))
    out["metrics"] = summarize(out["runs"])
    if any("peak_gpu_memory_gib" in r for r in out["runs"]):
        out["metrics"]["peak_gpu_memory_gib"] = max(r.get("peak_gpu_memory_gib", 0) for r in out["runs"])
    if sc.batches:  # in-process: the batch sweep (bench_triton sweeps concurrent gRPC requests instead)
        out["concurrency"] = []
        for b in sc.batches:  # one warm-up canvas per batch size: graph capture stays out of the timing
            run_generation(backend, random_prompt(b, sc.prompt_tokens, cfg.vocab_size, seed, dev),
                           sampler.replace(max_new_tokens=cfg.canvas_length), seed)
            m = run_generation(backend, random_prompt(b, sc.prompt_tokens, cfg.vocab_size, seed + b, dev),
                               sampler, seed, prog)
            out["concurrency"].append({"batch": b, "tok_s": m["generation_tok_s"], "requests_s": b / m["e2e_s"],
                                       "step_ms_p50": m["step_ms_p50"], "e2e_tok_s": m["e2e_tok_s"]})
    if sc.prompt_sweep:
        out["long_context"] = []
        for p in sc.prompt_sweep:
            run_generation(backend, random_prompt(1, p, cfg.vocab_size, seed, dev),
                           sampler.replace(max_new_tokens=cfg.canvas_length, max_denoising_steps=1), seed)
            m = run_generation(backend, random_prompt(1, p, cfg.vocab_size, seed + p, dev),
                               sampler.replace(max_new_tokens=cfg.canvas_length), seed, prog)
            out["long_context"].append({"prompt_tokens": p, "prefill_ms": m["prefill_ms"],
                                        "step_ms_p50": m["step_ms_p50"], "generation_tok_s": m["generation_tok_s"]})
    if prog:
        print(file=sys.stderr)
    if sc.ar_baseline:
        ar = run_ar_baseline(backend, random_prompt(1, sc.prompt_tokens, cfg.vocab_size, seed, dev), sc.ar_tokens)
        out["ar_baseline"] = ar
        if ar.get("available"):
            out["metrics"]["diffusion_over_ar"] = out["metrics"]["generation_tok_s"] / ar["tok_s"]
    return out
