"""`dgemma probe`: one bounded measuring run of the fast path on an H100/H200 that yields everything at once, and its
reduced CPU form (`--device cpu --tiny`: tiny shapes, the kernels under the Triton interpreter, seconds).

Phases, in this order: environment; ceilings (copy bandwidth, bf16 / fp8 GEMM FLOP rates); kernels (each fused kernel
at full shape against its torch reference: error, time, GB/s against the copy bandwidth of this run); step (the FP8
denoise step, kernels off and on, p50 / p99, CUDA graphs, and the logit agreement of the two); breakdown (ms by
category, kernels off = before and on = after, from FastBackend.profile_step); commit (a 256-token canvas); prefill
(1,024 tokens); anchor (batch 1, 16 fixed steps, 1,024 in / 1,024 out, prefill excluded: the reference sampler and
the fused head + sampler); batch4 (the same at batch 4, fused sampler); inflight (the serving loop's backend: one step
over 1, 2, 4, 8 rows in flight at different prefix lengths, CUDA graph per batch bucket, throughput against one row);
w4a16 (the NVFP4-expert model's step against FP8's). Before each phase the clock is read against --budget-s: a phase whose estimate would overrun is skipped and
the reason recorded; a phase that raises is recorded as failed and the run goes on. probe.json and probe.csv are
rewritten atomically after every phase. Uses only public APIs (FastBackend's, TorchGraphBackend's, dgemma.kernels' launchers and refs).
"""

from __future__ import annotations

import csv
import datetime
import gc
import io
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.config import FULL_SIZE, TINY, ModelConfig, SamplerConfig
from ..core.layout import current
from ..core.manifest import write_json_atomic, write_text_atomic
from ..core.profiles import weight_footprint
from ..core.stats import percentile
from ..generation.fused import fused_generate
from ..generation.sampler import entropy, generate
from ..kernels import attention as k_attn
from ..kernels import fp8_gemm as k_gemm
from ..kernels import fused_sampler as k_sampler
from ..kernels import moe as k_moe
from ..kernels import moe_w4a16 as k_w4a16
from ..kernels import norm_quant as k_norm
from ..kernels import qkv as k_qkv
from ..kernels import residual_norm as k_res
from ..model.lowp import E2M1_MAX, E4M3_MAX, fp8_quantize_rows, nvfp4_encode
from ..model.modeling import DiffusionGemma, rope_inv_freq
from ..runtime.fast import FastBackend, describe_footprint, quantize_fp8_, quantize_nvfp4_
from ..runtime.torch_backend import TorchGraphBackend
from .inprocess import random_prompt
from .telemetry import environment

CATEGORIES = ("moe", "dense_gemm", "attention", "head", "other")
# the least seconds each phase needs on an H100 at full size (JIT compiles and CUDA-graph captures included); the
# CPU form scales them by its own clock (Plan.cost_scale)
COST = {"environment": 2, "ceilings": 10, "kernels": 120, "model": 45, "step": 40, "breakdown": 20, "commit": 10,
        "prefill": 15, "anchor": 45, "batch4": 40, "inflight": 45, "w4a16": 90}


@dataclass
class Plan:
    cfg: ModelConfig
    dtype: torch.dtype
    prompt: int
    steps: int
    canvases: int
    reps: int
    batch: int  # the second scenario's batch
    inflight: int  # rows in flight of the serving loop's backend (the largest batch bucket)
    cost_scale: float
    warm: int  # warm-up calls before a timing (compiles, captures); none on CPU, where each interpreted call costs

    @classmethod
    def of(cls, tiny: bool, device: torch.device) -> "Plan":
        if tiny and device.type == "cpu":
            # bf16: the fused dense pass runs only on bf16 activations; one canvas of two steps, one timed call each
            return cls(TINY, torch.bfloat16, 40, 2, 1, 1, 2, 2, 0.25, 0)
        if tiny:
            return cls(TINY, torch.bfloat16, 40, 4, 2, 10, 2, 8, 0.25, 1)
        return cls(FULL_SIZE, torch.bfloat16, 1024, 16, 4, 30, 4, 8, 1.0, 1)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable, dev: torch.device, reps: int, warmup: int = 1, max_s: float = 20.0) -> list[float]:
    """ms per call: CUDA events on a GPU, perf_counter on CPU; stops early after max_s seconds."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    out, t_end = [], time.perf_counter() + max_s
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
        if time.perf_counter() > t_end:
            break
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


class _Clocked:
    """A backend's public API, forwarded, noting when the first denoising step starts (prefill excluded)."""

    def __init__(self, inner, dev: torch.device):
        self.inner, self.dev, self.first = inner, dev, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _mark(self):
        if self.first is None:
            _sync(self.dev)
            self.first = time.perf_counter()

    def denoise(self, *a):
        self._mark()
        return self.inner.denoise(*a)

    def sampler_step(self, *a):
        self._mark()
        return self.inner.sampler_step(*a)


class Probe:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device(args.device)
        self.plan = Plan.of(args.tiny, self.dev)
        self.t0 = time.perf_counter()
        self.budget = float(args.budget_s)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        gpu = torch.cuda.get_device_name(self.dev).replace(" ", "_") if self.dev.type == "cuda" else "cpu"
        self.out = Path(args.out) if args.out else current().results / "probe" / f"{stamp}-{gpu}"
        self.json_path = Path(args.json) if args.json else self.out / "probe.json"
        self.res: dict = {"config": {"device": str(self.dev), "tiny": args.tiny, "precision": args.precision,
                                     "budget_s": self.budget, "prompt": self.plan.prompt, "steps": self.plan.steps,
                                     "canvases": self.plan.canvases, "batch2": self.plan.batch,
                                     "dtype": str(self.plan.dtype), "started": stamp},
                          "phases": {}}
        self.rows: list[tuple] = []
        self.kernels_mode = "force" if self.dev.type == "cpu" else "auto"
        self.model = self.fb_on = self.fb_off = None
        self.copy_gbs = None

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def metric(self, phase: str, name: str, value, unit: str = "") -> None:
        self.res["phases"][phase].setdefault("metrics", {})[name] = value
        self.rows.append((phase, name, value, unit))

    def save(self) -> None:
        self.res["elapsed_s"] = time.perf_counter() - self.t0
        write_json_atomic(self.json_path, self.res, indent=2)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(("phase", "metric", "value", "unit"))
        w.writerows(self.rows)
        write_text_atomic(self.json_path.with_suffix(".csv"), buf.getvalue())

    def phase(self, name: str, fn: Callable, needs: tuple[str, ...] = ()) -> None:
        est = COST[name] * self.plan.cost_scale
        rec = self.res["phases"].setdefault(name, {})
        missing = [n for n in needs if self.res["phases"].get(n, {}).get("status") != "ok"]
        if missing:
            rec.update(status="skipped", reason=f"needs phase {', '.join(missing)}")
        elif self.left() < est:
            rec.update(status="skipped", reason=f"would overrun the budget: needs ~{est:.0f} s, "
                                                f"{max(self.left(), 0):.0f} s of {self.budget:.0f} s left")
        else:
            t = time.perf_counter()
            try:
                fn(name)
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - a failed phase is a result; the others still run
                rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc(limit=6)[-2000:])
            rec["seconds"] = time.perf_counter() - t
        print(f"[probe] {name:<11} {rec['status']:<8} {rec.get('seconds', 0):7.1f} s  "
              f"{rec.get('reason', rec.get('error', ''))}"[:200], flush=True)
        self.save()

    # -- phases ---------------------------------------------------------------------------------------------
    def environment(self, ph: str) -> None:
        env = environment(self.dev)
        env["triton_interpret"] = self.dev.type == "cpu"
        env["kernels"] = self.kernels_mode
        self.res["phases"][ph]["environment"] = env

    def ceilings(self, ph: str) -> None:
        dev, full = self.dev, not self.args.tiny
        n = (1 << 30) if full else (1 << 22)
        src = torch.empty(n, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        ms = statistics.median(timeit(lambda: dst.copy_(src), dev, 10 if full else 3))
        self.copy_gbs = 2 * n / (ms / 1e3) / 1e9
        self.metric(ph, "copy_bandwidth", self.copy_gbs, "GB/s (read + write)")
        src = dst = None
        m = 8192 if full else 256
        x, y = (torch.randn(m, m, device=dev, dtype=torch.bfloat16) for _ in range(2))
        ms = statistics.median(timeit(lambda: x @ y, dev, 10 if full else 2))
        self.metric(ph, "bf16_gemm", 2 * m**3 / (ms / 1e3) / 1e12, "TFLOP/s")
        if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9):
            (qa, sa), (qb, sb) = fp8_quantize_rows(x), fp8_quantize_rows(y)
            ms = statistics.median(timeit(lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(),
                                                                   out_dtype=torch.bfloat16), dev, 10))
            self.metric(ph, "fp8_gemm", 2 * m**3 / (ms / 1e3) / 1e12, "TFLOP/s")
        else:
            self.metric(ph, "fp8_gemm", None, "no FP8 tensor cores here")

    def kernels(self, ph: str) -> None:
        rows = []
        for case in kernel_cases(self.plan.cfg if not self.args.tiny else TINY, self.dev, full=not self.args.tiny):
            r = {"kernel": case.name, "category": case.category}
            try:
                out = case.run()
                ms = timeit(case.run, self.dev, 3 if self.args.tiny else 20, warmup=0, max_s=10)
                err = case.check(out)
                r.update(ms=statistics.median(ms), error=err, ok=err <= case.tol, tol=case.tol,
                         gb=case.bytes / 1e9)
                r["gbs"] = case.bytes / (r["ms"] / 1e3) / 1e9
                r["of_copy_bw"] = r["gbs"] / self.copy_gbs if self.copy_gbs else None
            except Exception as e:  # noqa: BLE001 - one kernel's failure is a row, not the end of the phase
                r.update(ok=False, failed=f"{type(e).__name__}: {e}"[:300])
            rows.append(r)
            self.rows.append((ph, case.name, r.get("ms"), f"ms; err {r.get('error')} (tol {case.tol}); "
                                                           f"{r.get('gbs') or 0:.0f} GB/s"))
            del case
        self.res["phases"][ph]["table"] = rows
        if not all(r["ok"] for r in rows):
            raise AssertionError("kernels off their reference: " + ", ".join(r["kernel"] for r in rows if not r["ok"]))

    def model_phase(self, ph: str) -> None:
        p = self.plan
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()  # the kernel cases' inputs
        t = time.perf_counter()
        model = DiffusionGemma.random(p.cfg, device=self.dev, dtype=p.dtype, seed=0)
        if self.args.precision == "fp8":
            quantize_fp8_(model)
        _sync(self.dev)
        self.metric(ph, "build_s", time.perf_counter() - t, "s")
        self.model = model
        ctx = p.prompt + (p.canvases + 1) * p.cfg.canvas_length
        self.fb_off = FastBackend(model, max_context=ctx, kernels="off")
        self.fb_on = FastBackend(model, max_context=ctx, kernels=self.kernels_mode)
        self.res["phases"][ph]["kernels_on"] = self.fb_on.kernels.summary()
        self.res["phases"][ph]["weights"] = self.fb_on.footprint
        self.metric(ph, "weights_GB", sum(self.fb_on.footprint.values()) / 1e9, "GB")
        g = torch.Generator(device=self.dev).manual_seed(0)
        self.prompt = random_prompt(1, p.prompt, p.cfg.vocab_size, 0, self.dev)
        self.canvas = torch.randint(0, p.cfg.vocab_size, (1, p.cfg.canvas_length), device=self.dev, generator=g)
        self.temp = torch.tensor(0.6, device=self.dev)

    def step(self, ph: str) -> None:
        p = self.plan
        out = {}
        for name, fb in (("off", self.fb_off), ("on", self.fb_on)):
            st = fb.new_state(1)
            fb.encode(st, self.prompt)
            raw, soft = fb.denoise(st, self.canvas, None, self.temp)  # captures the graph on a GPU
            out[name] = (raw.clone(), soft.clone())
            ms = timeit(lambda: fb.denoise(st, self.canvas, out["off"][1], self.temp), self.dev, p.reps,
                        warmup=p.warm)
            self.metric(ph, f"step_ms_p50_{name}", percentile(ms, 50), "ms")
            self.metric(ph, f"step_ms_p99_{name}", percentile(ms, 99), "ms")
            self.metric(ph, f"cuda_graphs_{name}", fb.use_graphs, "")
        self.metric(ph, "logits_rel_l2_on_vs_off", rel_l2(out["on"][0], out["off"][0]), "")
        self.metric(ph, "top1_on_vs_off", (out["on"][0].argmax(-1) == out["off"][0].argmax(-1)).float().mean().item(),
                    "")

    def breakdown(self, ph: str) -> None:
        table = {}
        for name, fb in (("off", self.fb_off), ("on", self.fb_on)):
            st = fb.new_state(1)
            fb.encode(st, self.prompt)
            for _ in range(self.plan.warm):  # compiles
                fb.profile_step(st, self.canvas, None, self.temp)
            table[name] = fb.profile_step(st, self.canvas, None, self.temp)
            for cat, ms in table[name].items():
                self.metric(ph, f"{cat}_ms_{name}", ms, "ms")
        self.res["phases"][ph]["table"] = table

    def commit(self, ph: str) -> None:
        for name, fb in (("off", self.fb_off), ("on", self.fb_on)):
            st = fb.new_state(1)
            fb.encode(st, self.prompt)
            p0 = fb.length(st)

            def once():
                fb.encode(st, self.canvas)
                fb.rewind(st, p0)
            ms = timeit(once, self.dev, max(1, self.plan.reps // 3), warmup=2 * self.plan.warm)
            self.metric(ph, f"commit_ms_{name}", statistics.median(ms), "ms (256 tokens)")

    def prefill(self, ph: str) -> None:
        for name, fb in (("off", self.fb_off), ("on", self.fb_on)):
            ms = timeit(lambda: fb.encode(fb.new_state(1), self.prompt), self.dev, max(1, self.plan.reps // 5),
                        warmup=self.plan.warm)
            self.metric(ph, f"prefill_ms_{name}", statistics.median(ms), f"ms ({self.plan.prompt} tokens)")

    def _generation(self, fb, batch: int, fused: bool) -> dict:
        p = self.plan
        scfg = SamplerConfig(max_new_tokens=p.canvases * p.cfg.canvas_length, max_denoising_steps=p.steps,
                             adaptive_stopping=False, ignore_eos=True)
        prompt = random_prompt(batch, p.prompt, p.cfg.vocab_size, 1, self.dev)
        run = (lambda b, **kw: fused_generate(b, prompt, scfg, seed=1, **kw)) if fused else \
            (lambda b, **kw: generate(b, prompt, scfg, torch.Generator(device=self.dev).manual_seed(1), **kw))
        for _ in range(p.warm):  # compiles and captures every key-span bucket
            run(fb)
        clocked, marks = _Clocked(fb, self.dev), {}

        def on_canvas(i, committed):
            _sync(self.dev)
            marks["end"] = time.perf_counter()
        out = run(clocked, on_canvas=on_canvas)
        s = marks["end"] - clocked.first
        toks = out.new_tokens.numel()
        return {"tokens": toks, "s": s, "tok_s": toks / s, "ms_per_step": s * 1e3 / sum(out.steps_per_canvas)}

    def anchor(self, ph: str) -> None:
        for name, fused in (("reference_sampler", False), ("fused_sampler", True)):
            r = self._generation(self.fb_on, 1, fused)
            self.res["phases"][ph][name] = r
            self.metric(ph, f"tok_s_{name}", r["tok_s"], "generated tok/s (prefill excluded)")
            self.metric(ph, f"ms_per_step_{name}", r["ms_per_step"], "ms")

    def batch4(self, ph: str) -> None:
        r = self._generation(self.fb_on, self.plan.batch, True)
        self.res["phases"][ph]["fused_sampler"] = r
        self.metric(ph, "tok_s_fused_sampler", r["tok_s"], f"generated tok/s, batch {self.plan.batch}")
        self.metric(ph, "ms_per_step_fused_sampler", r["ms_per_step"], "ms")

    def inflight(self, ph: str) -> None:
        """The serving loop's path under in-flight batching: TorchGraphBackend over the same model (per-row prefix
        lengths, batch buckets, one CUDA graph per bucket on a GPU), one denoising step over 1..N rows whose
        prompts differ in length; row 0's logits in each batch against row 0 alone."""
        p = self.plan
        sizes = TorchGraphBackend.bucket_sizes(p.inflight)
        be = TorchGraphBackend(self.model, max_context=p.prompt + p.cfg.canvas_length, buckets=True)
        st = be.new_state(sizes[-1])
        g = torch.Generator(device=self.dev).manual_seed(3)
        for r in range(sizes[-1]):
            n = max(1, p.prompt - 8 * r)
            be.encode(st, torch.randint(0, p.cfg.vocab_size, (1, n), device=self.dev, generator=g), rows=[r])
        canvas = torch.randint(0, p.cfg.vocab_size, (sizes[-1], p.cfg.canvas_length), device=self.dev, generator=g)
        temps = torch.rand(sizes[-1], device=self.dev, generator=g) * 0.6 + 0.4
        alone = be.denoise(st, canvas[:1], None, temps[:1], rows=[0])[0].float()
        one = None
        for b in sizes:
            rows = list(range(b))
            raw = be.denoise(st, canvas[:b], None, temps[:b], rows=rows)[0]  # captures the bucket on a GPU
            self.metric(ph, f"row0_rel_l2_rows{b}_vs_alone", rel_l2(raw[:1].float(), alone), "")
            del raw
            ms = percentile(timeit(lambda: be.denoise(st, canvas[:b], None, temps[:b], rows=rows), self.dev,
                                   p.reps, warmup=p.warm), 50)
            one = one or ms
            self.metric(ph, f"step_ms_p50_rows{b}", ms, "ms")
            self.metric(ph, f"throughput_rows{b}_vs_rows1", b * one / ms, "x (tokens per second against one row)")
        self.metric(ph, "cuda_graphs", be.use_graphs, "")

    def w4a16(self, ph: str) -> None:
        p = self.plan
        self.model = self.fb_on = self.fb_off = None  # the FP8 model goes before the NVFP4 one is built
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        model = quantize_nvfp4_(DiffusionGemma.random(p.cfg, device=self.dev, dtype=p.dtype, seed=0))
        _sync(self.dev)
        self.metric(ph, "build_s", time.perf_counter() - t, "s")
        fb = FastBackend(model, max_context=p.prompt + 2 * p.cfg.canvas_length, kernels=self.kernels_mode)
        self.res["phases"][ph]["weights"] = fb.footprint
        self.res["phases"][ph]["weights_summary"] = describe_footprint(fb.footprint)
        self.metric(ph, "weights_GB", sum(fb.footprint.values()) / 1e9, "GB")
        self.metric(ph, "weights_GB_arithmetic", sum(weight_footprint(p.cfg, "nvfp4", "fp8").values()) / 1e9, "GB")
        self.res["phases"][ph]["kernels_on"] = fb.kernels.summary()
        st = fb.new_state(1)
        fb.encode(st, self.prompt)
        fb.denoise(st, self.canvas, None, self.temp)  # compiles, captures
        ms = timeit(lambda: fb.denoise(st, self.canvas, None, self.temp), self.dev, p.reps, warmup=p.warm)
        self.metric(ph, "step_ms_p50", percentile(ms, 50), "ms")
        self.metric(ph, "step_ms_p99", percentile(ms, 99), "ms")
        fp8 = self.res["phases"].get("step", {}).get("metrics", {}).get("step_ms_p50_on")
        if fp8:
            self.metric(ph, "speedup_vs_fp8", fp8 / percentile(ms, 50), "x")

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.phase("environment", self.environment)
        self.phase("ceilings", self.ceilings)
        self.phase("kernels", self.kernels)
        self.phase("model", self.model_phase)
        self.phase("step", self.step, needs=("model",))
        self.phase("breakdown", self.breakdown, needs=("model",))
        self.phase("commit", self.commit, needs=("model",))
        self.phase("prefill", self.prefill, needs=("model",))
        self.phase("anchor", self.anchor, needs=("model",))
        self.phase("batch4", self.batch4, needs=("model",))
        self.phase("inflight", self.inflight, needs=("model",))
        self.phase("w4a16", self.w4a16)
        self.res["files"] = {"json": str(self.json_path), "csv": str(self.json_path.with_suffix(".csv"))}
        self.save()
        return self.res


def run(args) -> dict:
    return Probe(args).run()


# -- the kernel cases ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    category: str
    run: Callable  # -> output
    check: Callable  # output -> error against the reference (the metric `tol` bounds)
    tol: float
    bytes: int  # HBM bytes one call must move at least (weights, activations, outputs)


def kernel_cases(cfg: ModelConfig, dev: torch.device, full: bool) -> list[Case]:
    """Each fused kernel at the model's shape (a 256-token canvas, batch 1; attention over a 1,023-slot sliding cache
    and 2,048 cached tokens on full layers) with random inputs, and its reference check. Errors are rel-L2 against
    the torch reference (argmax mismatch fraction for the head)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    gd = torch.Generator(device=dev).manual_seed(0)  # full-size weights are drawn where they live
    bf = torch.bfloat16

    def rnd(*shape, scale=1.0, dtype=bf):
        return (torch.randn(shape, generator=gd, device=dev) * scale).to(dtype)

    h, i, e, k, mi = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k_experts, \
        cfg.moe_intermediate_size
    t = cfg.canvas_length
    eps = cfg.rms_norm_eps
    cases = []
    # MoE
    x = rnd(t, h)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(dev)
    w = torch.softmax(torch.randn(t, k, generator=g), -1).to(dev)
    (qg, sg), (qd, sd) = fp8_quantize_rows(rnd(e, 2 * mi, h, scale=h ** -0.5)), \
        fp8_quantize_rows(rnd(e, h, mi, scale=mi ** -0.5))
    sg, sd = sg.squeeze(-1), sd.squeeze(-1)
    hit = len(set(idx.flatten().tolist()))
    moe_bytes = hit * 3 * h * mi + 2 * t * h * 2
    cases.append(Case("fp8_moe", "moe", lambda: k_moe.fp8_moe(x, w, idx, qg, sg, qd, sd),
                      lambda o: rel_l2(o, k_moe.fp8_moe_reference(x, w, idx, qg, sg, qd, sd)), 2e-2, moe_bytes))
    wgu, wd = rnd(e, 2 * mi, h, scale=h ** -0.5), rnd(e, h, mi, scale=mi ** -0.5)
    s2g, s2d = (wgu.float().abs().amax(dim=(1, 2)) / (E2M1_MAX * E4M3_MAX),
                wd.float().abs().amax(dim=(1, 2)) / (E2M1_MAX * E4M3_MAX))
    (pg, bg), (pd, bd) = nvfp4_encode(wgu, s2g), nvfp4_encode(wd, s2d)
    del wgu, wd
    args4 = (x, w, idx, pg, bg, s2g, pd, bd, s2d)
    cases.append(Case("w4a16_moe", "moe", lambda: k_w4a16.w4a16_moe(*args4),
                      lambda o: rel_l2(o, k_w4a16.w4a16_moe_reference(*args4)), 2e-2,
                      int(hit * 3 * h * mi * (0.5 + 1 / 16)) + 2 * t * h * 2))
    # attention: sliding (cache W-1 + canvas) and full (2,048 cached tokens)
    for sliding in (True, False):
        layer = next(j for j in range(cfg.num_hidden_layers) if cfg.is_sliding(j) == sliding)
        hd, kvh, nh = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer), cfg.num_attention_heads
        cap = cfg.sliding_cache_len if sliding else (2048 if full else 48)
        q = rnd(1, nh, t, hd)
        kc, vc, kn, vn = rnd(1, kvh, cap, hd), rnd(1, kvh, cap, hd), rnd(1, kvh, t, hd), rnd(1, kvh, t, hd)
        past = torch.tensor([cap if not sliding else 4 * cfg.sliding_window], device=dev)
        win = cfg.sliding_window if sliding else None
        qn = F.normalize(q.float(), dim=-1).to(bf) * 4  # RMS-normed-like q and k: scores O(1) to O(10)
        kcn, knn = F.normalize(kc.float(), dim=-1).to(bf) * 4, F.normalize(kn.float(), dim=-1).to(bf) * 4
        cases.append(Case(f"attention_{'sliding' if sliding else 'full'}_hd{hd}", "attention",
                          lambda qn=qn, kcn=kcn, vc=vc, knn=knn, vn=vn, past=past, win=win:
                          k_attn.attention(qn, kcn, vc, knn, vn, past, False, win),
                          lambda o, qn=qn, kcn=kcn, vc=vc, knn=knn, vn=vn, past=past, win=win:
                          rel_l2(o, k_attn.attention_ref(qn, kcn, vc, knn, vn, past, False, win)), 1e-2,
                          2 * (qn.numel() * 2 + 2 * (kcn.numel() + knn.numel())) + q.numel() * 2))
    # dense: QKV (sliding), o_proj, dense MLP, norms
    layer = next(j for j in range(cfg.num_hidden_layers) if cfg.is_sliding(j))
    hd, kvh, nh = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer), cfg.num_attention_heads
    a8, a_s = fp8_quantize_rows(rnd(t, h))
    wq, wsq = fp8_quantize_rows(rnd((nh + 2 * kvh) * hd, h, scale=h ** -0.5))
    wsq = wsq.reshape(-1)
    qnorm, knorm = rnd(hd, scale=0.1) + 1, rnd(hd, scale=0.1) + 1
    past32 = torch.tensor([64], dtype=torch.int32, device=dev)
    cos, sin = k_qkv.rope_tables(past32, t, rope_inv_freq(cfg, True).to(dev))
    cap = cfg.sliding_cache_len + t
    kv = dict(n_heads=nh, kv_heads=kvh, head_dim=hd, q_norm=qnorm, k_norm=knorm, cos=cos, sin=sin, past=past32,
              seq_len=t, slot_base=cfg.sliding_cache_len, eps=eps)
    caches = [torch.zeros(1, kvh, cap, hd, dtype=bf, device=dev) for _ in range(4)]
    cases.append(Case("qkv_project_sliding", "dense_gemm",
                      lambda: k_qkv.qkv_project(a8, a_s, wq, wsq, k_cache=caches[0], v_cache=caches[1], **kv),
                      lambda o: rel_l2(o, k_qkv.qkv_ref(a8, a_s, wq, wsq, k_cache=caches[2], v_cache=caches[3], **kv)),
                      1e-2, wq.numel() + a8.numel() + 2 * o_numel(nh, kvh, t, hd)))
    ao8, ao_s = fp8_quantize_rows(rnd(t, nh * hd))
    wo, wso = fp8_quantize_rows(rnd(h, nh * hd, scale=(nh * hd) ** -0.5))
    wso = wso.reshape(-1)
    cases.append(Case("gemm_o_proj", "dense_gemm", lambda: k_gemm.gemm(ao8, wo, wso, a_scale=ao_s),
                      lambda o: rel_l2(o, k_gemm.gemm_ref(ao8, wo, wso, a_scale=ao_s)), 1e-2,
                      wo.numel() + ao8.numel() + 2 * t * h))
    wgu8, wgus = fp8_quantize_rows(rnd(2 * i, h, scale=h ** -0.5))
    wd8, wds = fp8_quantize_rows(rnd(h, i, scale=i ** -0.5))
    wgus, wds = wgus.reshape(-1), wds.reshape(-1)

    def mlp():
        hh, amax = k_gemm.gemm_gelu(a8, wgu8, wgus, a_scale=a_s, amax_out=True)
        return k_gemm.gemm(hh, wd8, wds, a_amax=amax)

    def mlp_ref():
        hh, _ = k_gemm.gemm_gelu_ref(a8, wgu8, wgus, a_scale=a_s)
        return k_gemm.gemm_ref(hh, wd8, wds, a_amax=hh.float().abs().amax(-1, keepdim=True))
    cases.append(Case("dense_mlp", "dense_gemm", mlp, lambda o: rel_l2(o, mlp_ref()), 3e-2,
                      wgu8.numel() + wd8.numel() + a8.numel() + 2 * t * h + 2 * 2 * t * i))
    xr, attn_o = rnd(t, h, scale=2.0), rnd(t, h, scale=0.3)
    nw = [rnd(h, scale=0.1) + 1 for _ in range(6)]
    rscale, rproj, pes = rnd(h, scale=0.1) + 1, rnd(e, h, scale=0.5), rnd(e, scale=0.1) + 1
    pa_args = (xr, attn_o, nw[0], nw[1], nw[2], rscale, rproj, pes, k, eps)
    cases.append(Case("post_attention", "other",
                      lambda: k_res.post_attention(*pa_args, quant_ff=True, quant_ff2=False, ff2_bf16=True).r,
                      lambda o: rel_l2(o, k_res.post_attention_ref(*pa_args)[0]), 1e-2, 2 * t * h * 2 * 4))
    h1, h2 = rnd(t, h), rnd(t, h)
    scal = torch.tensor([0.9], dtype=bf, device=dev)
    cases.append(Case("post_ffn", "other", lambda: k_res.post_ffn(xr, h1, h2, nw[3], nw[4], nw[5], scal, eps),
                      lambda o: rel_l2(o, k_res.post_ffn_ref(xr, h1, h2, nw[3], nw[4], nw[5], scal, eps)[0]), 1e-2,
                      2 * t * h * 2 * 4))
    cases.append(Case("norm_quant", "other", lambda: k_norm.norm_quant(xr, nw[0], eps)[0],
                      lambda o: rel_l2(o.float(), k_norm.norm_quant_ref(xr, nw[0], eps)[0].float()), 1e-2,
                      t * h * 3))
    # head + sampler: LM head, softcap, partials, reduction, soft embedding, canvas step
    emb = rnd(cfg.vocab_size, h, scale=0.02)
    hid = rnd(1, t, h)
    fs = k_sampler.FusedSampler(k_sampler.HeadWeights(emb), canvas_length=t, softcap=cfg.final_logit_softcapping)
    st = fs.new_state(1, [0])
    temp = torch.tensor(0.7, device=dev)

    def head():
        return fs.step(st, hid, temp)

    def head_check(out):
        raw = torch.tanh(F.linear(hid, emb).float() / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        proc = raw / temp
        mism = (out.argmax.view(-1) != proc.argmax(-1).view(-1)).float().mean().item()
        return max(mism, (out.entropy.view(-1) - entropy(proc).view(-1)).abs().max().item())
    cases.append(Case("head_sampler", "head", head, head_check, 5e-2,
                      2 * emb.numel() * 2 + 4 * t * cfg.vocab_size * 2))
    return cases


def o_numel(nh: int, kvh: int, t: int, hd: int) -> int:
    """bf16 elements QKV writes: q, k, v."""
    return (nh + 2 * kvh) * t * hd


# -- the closing table --------------------------------------------------------------------------------------------
def table(res: dict) -> str:
    def f(x, nd=2):
        return "-" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else str(x))

    out = [f"probe on {res['config']['device']} ({'tiny' if res['config']['tiny'] else 'full size'}), "
           f"{res.get('elapsed_s', 0):.0f} s of {res['config']['budget_s']:.0f}"]
    for name, ph in res["phases"].items():
        out.append(f"  {name:<11} {ph['status']:<8} {ph.get('seconds', 0):6.1f} s  "
                   f"{ph.get('reason', ph.get('error', ''))}"[:140])
    kt = res["phases"].get("kernels", {}).get("table")
    if kt:
        out.append(f"  {'kernel':<26} {'category':<10} {'ms':>9} {'GB/s':>8} {'of copy':>7} {'error':>9}  ok")
        for r in kt:
            gbs = r.get("gbs")
            out.append(f"  {r['kernel']:<26} {r['category']:<10} {f(r.get('ms'), 3):>9} "
                       f"{f(gbs, 0 if (gbs or 0) >= 10 else 4):>8} "
                       f"{f(r.get('of_copy_bw'), 2):>7} {f(r.get('error'), 4) if 'error' in r else '-':>9}  "
                       f"{'yes' if r['ok'] else 'NO ' + r.get('failed', '')}")
    bd = res["phases"].get("breakdown", {}).get("table")
    if bd:
        out.append(f"  {'category (ms/step)':<26} {'before':>9} {'after':>9}")
        for c in CATEGORIES:
            out.append(f"  {c:<26} {f(bd['off'].get(c), 3):>9} {f(bd['on'].get(c), 3):>9}")
    for name in ("step", "commit", "prefill", "anchor", "batch4", "w4a16"):
        for k, v in res["phases"].get(name, {}).get("metrics", {}).items():
            out.append(f"  {name + '.' + k:<40} {f(v) if isinstance(v, (float, int)) else v}")
    return "\n".join(out)
