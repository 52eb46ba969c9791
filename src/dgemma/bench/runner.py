"""One `dgemma bench` run: a target, a backend and scenarios -> one JSON result per scenario under
bench/results/<gpu>/<precision>/ (same schema for every backend; what a backend cannot observe is None with the
reason). In-process backends come from the one factory; `triton` measures the served `dgemma` model over gRPC
(rendering and starting tritonserver unless a URL is given) against the same prompts generated in-process."""

from __future__ import annotations

import contextlib
import datetime
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.layout import current
from ..core.manifest import write_json_atomic
from ..core.profiles import Target, resolve
from ..model.checkpoint import SYNTHETIC, checkpoint_dir, load_config_of
from ..model.tokens import Tokenizer
from ..runtime.factory import Engine, create
from ..serving.render import render
from ..serving.server import Server
from .inprocess import run_scenario
from .metrics import roofline
from .scenario import Scenario
from .served import run_served_scenario
from .telemetry import Telemetry, environment

BACKENDS = ("torch", "fast", "ort", "trt", "triton")


@dataclass
class BenchArgs:
    gpu: str = "cpu"
    precision: str = "bf16"
    backend: str = "torch"
    scenarios: tuple[str, ...] = ("anchor", "adaptive")
    checkpoint: str | None = None
    device: str | None = None
    seed: int = 0
    measured_gbs: float | None = None
    onnx_dir: str | None = None
    url: str | None = None  # triton: a running server's gRPC host:port
    metrics_url: str | None = None  # triton with url: its metrics endpoint (in-loop step time, batch sizes)
    serve_backend: str | None = None  # triton: the canvas loop's backend (default: render's)
    no_reference: bool = False
    threads: int | None = None
    server_timeout: float = 120.0
    out: str | None = None  # results root (default: bench/results in the work directory)


@dataclass
class Outcome:
    written: list[Path]
    wrong: list[str]  # scenarios whose served answers were wrong
    summaries: list[str]


def _check(a: BenchArgs, target: Target) -> None:
    if a.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {a.backend!r}; valid: {', '.join(BACKENDS)}.")
    if a.url and a.backend != "triton":
        raise ConfigError("--url talks to a running Triton server; it needs --backend triton.")
    device = a.device or ("cuda" if target.gpu.sm else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available() and a.backend in ("torch", "fast"):
        raise ConfigError(f"--device {device} but no CUDA GPU is visible; run GPU=cpu for the CPU form.")
    if a.backend == "triton" and a.checkpoint == SYNTHETIC:
        raise ConfigError("--backend triton needs a checkpoint directory (the server loads it and the client needs "
                          "its tokenizer); --checkpoint synthetic exists only in-process.")


def _in_process(a: BenchArgs, target: Target, checkpoint, serve_backend: str, threads) -> Engine | None:
    """The backend measured here: the benchmarked one, or (triton) the in-process twin of the server's loop."""
    if a.backend == "triton":
        if a.no_reference:
            return None
        kind = {"ort": "ort", "torch": "torch", "bls": "ort" if target.gpu.sm == 0 else "torch"}[serve_backend]
    else:
        kind = a.backend
    device = a.device or ("cuda" if target.gpu.sm else "cpu")
    return create(kind, target.precision.value, target.gpu.name, checkpoint, device=device, threads=threads,
                  max_context=target.gpu.max_context,  # fixed-size KV buffers cost their full length per step
                  onnx_dir=a.onnx_dir, dtype="bfloat16" if checkpoint == SYNTHETIC else None)


@contextlib.contextmanager
def _server(a: BenchArgs, target: Target, checkpoint, serve_backend: str, threads):
    """(gRPC url, metrics url) of the server to measure: --url, or one rendered and started here (stopped at exit,
    also on SIGTERM, which is turned into KeyboardInterrupt while it runs)."""
    if a.url:
        yield a.url, a.metrics_url
        return
    sigterm = signal.getsignal(signal.SIGTERM)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    server = None
    try:
        root = render(target.gpu.name, target.precision.value, checkpoint, backend=serve_backend, threads=threads)
        print(f"== starting tritonserver on {root}", file=sys.stderr)
        server = Server(root)
        server.start(timeout_s=a.server_timeout)
        yield server.grpc_url, server.metrics_url
    finally:
        if server:
            server.stop()
        signal.signal(signal.SIGTERM, sigterm)


def run(a: BenchArgs) -> Outcome:
    target = resolve(a.gpu, a.precision, a.backend)
    _check(a, target)
    served = a.backend == "triton"
    checkpoint = a.checkpoint or (SYNTHETIC if target.gpu.sm and not served else None)
    # GPU=cpu: one thread by default. On a shared 2-core box two torch (or ORT, whose idle workers spin) threads
    # next to anything else run 5-20x slower and vary run to run; one thread gives repeatable figures.
    threads = a.threads if a.threads is not None else (1 if target.gpu.sm == 0 else None)
    if threads:
        torch.set_num_threads(threads)
    serve_backend = a.serve_backend or ("ort" if target.gpu.sm == 0 else "torch")  # render's default loop
    engine = _in_process(a, target, checkpoint, serve_backend, threads)
    cfg, base = (engine.config, engine.sampler) if engine else load_config_of(checkpoint)
    extra: dict = {"threads": threads, **(engine.info if engine else {})}
    tok = None
    if served:
        ck = checkpoint_dir(checkpoint)
        tok = engine.tokenizer if engine and engine.tokenizer else Tokenizer(ck)
        extra["triton"] = {"model": "dgemma", "protocol": "grpc streaming", "canvas_loop_backend": serve_backend,
                           "in_process_reference": None if engine is None else f"{engine.kind} on "
                                                                               f"{engine.backend.device}",
                           "server": "external (--url)" if a.url else "started by dgemma bench"}
    dev = torch.device(a.device or ("cuda" if target.gpu.sm else "cpu"))
    tel_device = dev if torch.cuda.is_available() or dev.type != "cuda" else torch.device("cpu")
    env = environment(tel_device)
    out_dir = (Path(a.out) if a.out else current().results) / target.gpu.name / target.precision.value
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outcome = Outcome([], [], [])
    scenarios = [Scenario.load(s) for s in a.scenarios]
    with (_server(a, target, checkpoint, serve_backend, threads) if served else contextlib.nullcontext((None, None))) \
            as (url, metrics_url):
        for sc in scenarios:
            sc = sc.fit(target.gpu, cfg, served=served)
            print(f"== {sc.name}: {sc.description}", file=sys.stderr)
            with Telemetry(tel_device) as tel:
                if served:
                    extra["triton"]["url"] = url
                    res = run_served_scenario(url, tok, cfg, base, sc, seed=a.seed,
                                              reference=engine.backend if engine else None, metrics_url=metrics_url)
                    if not res["all_correct"]:
                        outcome.wrong.append(sc.name)
                else:
                    res = run_scenario(engine.backend, cfg, base, sc, seed=a.seed)
            roof = roofline(cfg, target.precision, sc.prompt_tokens + sc.max_new_tokens // 2,
                            a.measured_gbs or target.gpu.hbm_gbs, sc.batch)
            m = res["metrics"]
            if m.get("denoise_ms_p50") and roof["step_floor_ms"] == roof["step_floor_ms"]:
                roof["measured_over_floor"] = m["denoise_ms_p50"] / roof["step_floor_ms"]
            record = {
                "schema": 1, "timestamp": stamp, "scenario": sc.__dict__, "gpu_profile": target.gpu.__dict__,
                "precision": target.precision.value, "backend": a.backend,
                "checkpoint": checkpoint or "tiny-default", "model": cfg.to_hf_dict()["text_config"] | {
                    "canvas_length": cfg.canvas_length, "param_count": cfg.param_count()},
                "environment": env, "telemetry": tel.summary(), "roofline": roof, **extra, **res,
            }
            name = f"{stamp}-{env['git_commit']}-{sc.name}-{a.backend}.json"
            outcome.written.append(write_json_atomic(out_dir / name, record))
            outcome.summaries.append(summary(sc.name, m, roof, res))
            print(outcome.summaries[-1])
    return outcome


def summary(name: str, m: dict, roof: dict, res: dict) -> str:
    """One console line per scenario (plus the concurrency levels and the Triton overhead when measured)."""
    f = lambda x, nd=1: "–" if x is None or x != x else f"{x:,.{nd}f}"  # noqa: E731  (None / NaN: no figure)
    line = (f"{name:<13} gen {f(m['generation_tok_s']):>9} tok/s | e2e {f(m['e2e_tok_s']):>9} tok/s | step p50 "
            f"{f(m['step_ms_p50'], 2)} ms (denoise {f(m['denoise_ms_p50'], 2)}, floor {f(roof['step_floor_ms'], 2)}) | "
            f"steps/canvas {f(m['mean_steps_per_canvas'])} | TPF {f(m['tokens_per_forward'], 2)}")
    if m.get("diffusion_over_ar"):
        line += f" | x{m['diffusion_over_ar']:.2f} vs AR"
    for c in res.get("concurrency", []):
        if "concurrency" in c:
            line += (f"\n  concurrency {c['concurrency']:>3}: {c['requests_s']:8.2f} req/s {c['tok_s']:10.1f} tok/s | "
                     f"latency p50 {c['latency_ms_p50']:8.1f} p99 {c['latency_ms_p99']:8.1f} ms | "
                     + (f"step {f(c.get('step_ms_in_loop'), 2)} ms in loop | " if c.get("step_ms_in_loop") else "")
                     + (f"mean rows per step {c['mean_rows_per_step']:.2f} | " if c.get("mean_rows_per_step") else "")
                     + (f"mean denoiser batch {c['mean_denoiser_batch']:.2f} | " if c.get("mean_denoiser_batch") else "")
                     + f"{'all correct' if c['all_correct'] else 'WRONG: ' + '; '.join(c['problems'])}")
    o = res.get("triton_overhead", {})
    if o.get("available"):
        line += (f"\n  Triton / in-process: x{o['ratio_per_request']:.2f} per request "
                 f"({o['overhead_ms_per_request']:+.1f} ms), {o['overhead_ms_per_step']:+.2f} ms per denoising step"
                 + (f", x{o['ratio_per_step']:.2f} inter-canvas per step" if o.get("ratio_per_step") else ""))
    return line
