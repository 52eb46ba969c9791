"""In-process benchmarks: scenarios run through any Backend with a timing trace, the AR baseline of the same
backbone, and the batch / long-context sweeps. The arithmetic lives in .metrics; knows nothing of Triton."""

from __future__ import annotations

import sys
import time

import torch

from ..core.config import ModelConfig, SamplerConfig
from ..generation.sampler import generate
from ..runtime.base import Observed
from .metrics import derive, summarize
from .scenario import Scenario


class TimedBackend(Observed):
    """A Backend recording a timing trace of {"kind", "t0", "t1"} events (device synchronised around each call):
    prefill / commit (encoder calls), denoise, step (denoise start -> sampler done), canvas (commit seen)."""

    def __init__(self, inner, trace: list[dict], pad_token_id: int | None = None):
        super().__init__(inner, self._record, sync=True)
        self.trace = trace
        self.pad = pad_token_id
        self._encodes = 0
        self._step_t0 = None

    def _record(self, kind: str, t0: float, t1: float) -> None:
        if kind == "encode":
            kind = "prefill" if self._encodes == 0 else "commit"
            self._encodes += 1
        else:
            self._step_t0 = t0
        self.trace.append({"kind": kind, "t0": t0, "t1": t1})

    def new_state(self, batch):
        self._encodes = 0
        return self.inner.new_state(batch)

    def step_done(self, _event):
        self.trace.append({"kind": "step", "t0": self._step_t0, "t1": self.now()})

    def canvas_done(self, _i, committed):
        n = None if self.pad is None else int((committed != self.pad).sum())  # committed non-pad tokens
        self.trace.append({"kind": "canvas", "t0": None, "t1": self.now(), "tokens": n})


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
