"""`dgemma bench`: flags -> one backend (in-process torch/fast/ort/trt, or the Triton dgemma model over gRPC) ->
scenarios -> one JSON result per scenario under bench/results/<gpu>/<precision>/ (same schema for every
backend; what a backend cannot observe is None with the reason). Measuring lives in bench / bench_triton."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from .errors import ArtifactError, ConfigError

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("torch", "fast", "ort", "trt", "triton")


def onnx_dir_for(target, override: str | None) -> Path:
    """ORT reads fp32 graphs on the cpu profile (bf16 does not run on ORT's CPU provider), else <precision>."""
    if override:
        return Path(override)
    return ROOT / "build" / "onnx" / ("fp32" if target.gpu.sm == 0 else target.precision.value)


def ort_backend(target, checkpoint: Path | None, cfg, override: str | None, max_context: int | None,
                threads: int | None = None):
    from .runtime.ort_backend import OrtBackend

    d = onnx_dir_for(target, override)
    if not (d / "manifest.json").exists():
        p = d.name if d.parent == ROOT / "build" / "onnx" else "fp32"
        raise ArtifactError(f"{d}/manifest.json not found: --backend ort needs the exported ONNX graphs there. "
                            f"Export them with: make onnx PRECISION={p}" + ("" if override else
                                                                           " (or pass --onnx-dir DIR)"))
    return OrtBackend(d, checkpoint=checkpoint, cfg=cfg, max_context=max_context, threads=threads)


def trt_backend(target, max_context: int | None):
    """TensorRT engines from engines/<gpu>/<precision>/ (TrtBackend raises ConfigError without TensorRT or GPU)."""
    from .runtime.trt_backend import TrtBackend

    d = ROOT / "engines" / target.gpu.name / target.precision.value
    if not (d / "manifest.json").exists():
        raise ArtifactError(f"{d}/manifest.json not found: --backend trt needs TensorRT engines there. Build them "
                            f"with: make engines GPU={target.gpu.name} PRECISION={target.precision.value}")
    return TrtBackend(d, max_context=max_context)


def _write(out_dir: Path, name: str, record: dict) -> Path:
    path = out_dir / name
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def _summary(name: str, m: dict, roof: dict, res: dict) -> str:
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
                     f"{'all correct' if c['all_correct'] else 'WRONG: ' + '; '.join(c['problems'])}")
    o = res.get("triton_overhead", {})
    if o.get("available"):
        line += (f"\n  Triton / in-process: x{o['ratio_per_request']:.2f} per request "
                 f"({o['overhead_ms_per_request']:+.1f} ms), {o['overhead_ms_per_step']:+.2f} ms per denoising step"
                 + (f", x{o['ratio_per_step']:.2f} inter-canvas per step" if o.get("ratio_per_step") else ""))
    return line


def cmd_bench(args) -> int:
    import torch

    from .bench import Scenario, roofline, run_scenario
    from .cli import SYNTHETIC, _int_arg, load_model, make_backend
    from .profiles import resolve
    from .telemetry import Telemetry, environment

    target = resolve(args.gpu, args.precision)
    if args.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {args.backend!r}; valid: {', '.join(BACKENDS)}.")
    served = args.backend == "triton"
    if args.url and not served:
        raise ConfigError("--url talks to a running Triton server; it needs --backend triton.")
    seed = _int_arg("--seed", args.seed, 0, 2**31 - 1)
    device = args.device or ("cuda" if target.gpu.sm else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available() and args.backend in ("torch", "fast"):
        raise ConfigError(f"--device {device} but no CUDA GPU is visible; run GPU=cpu for the CPU form.")
    scenarios = [Scenario.load(s.strip()) for s in args.scenario.split(",") if s.strip()]
    checkpoint = args.checkpoint or (SYNTHETIC if target.gpu.sm and not served else None)
    if served and checkpoint == SYNTHETIC:
        raise ConfigError("--backend triton needs a checkpoint directory (the server loads it and the client needs "
                          "its tokenizer); --checkpoint synthetic exists only in-process.")
    max_context = target.gpu.max_context  # KV capacity: fixed-size buffers cost their full length per step
    # GPU=cpu: one thread by default. On a shared 2-core box two torch (or ORT, whose idle workers spin) threads
    # next to anything else run 5-20x slower and vary run to run; one thread gives repeatable figures.
    threads = args.threads if args.threads is not None else (1 if target.gpu.sm == 0 else None)
    if threads:
        torch.set_num_threads(threads)
    extra: dict = {"threads": threads}
    serve_backend = args.serve_backend or ("ort" if target.gpu.sm == 0 else "torch")  # render's default loop
    # which backend runs in this process: the benchmarked one, or (triton) the in-process twin of the server's loop
    kind = args.backend if not served else None if args.no_reference else \
        {"ort": "ort", "torch": "torch", "bls": "ort" if target.gpu.sm == 0 else "torch"}[serve_backend]
    model = tok = backend = None
    if kind in ("torch", "fast"):
        model, cfg, base, tok = load_model(checkpoint, device, "bfloat16" if checkpoint == SYNTHETIC else None)
        backend = make_backend(kind, model, target.precision.value, max_context)
    else:
        from .checkpoint import load_config
        from .config import FULL_SIZE, SamplerConfig
        from .tiny import ensure_tiny

        ck = None if checkpoint == SYNTHETIC else Path(checkpoint) if checkpoint else ensure_tiny()
        cfg, base = (FULL_SIZE, SamplerConfig()) if ck is None else load_config(ck)
        if kind == "ort":
            backend = ort_backend(target, ck, cfg, args.onnx_dir, max_context, threads)
            extra["onnx_dir"] = str(backend.onnx_dir)
            extra["onnx_precision"] = backend.precision
        elif kind == "trt":
            backend = trt_backend(target, max_context)
    if served:
        from .tiny import ensure_tiny
        from .tokens import Tokenizer

        tok = tok or Tokenizer(Path(checkpoint) if checkpoint else ensure_tiny())
        extra["triton"] = {"model": "dgemma", "protocol": "grpc streaming", "canvas_loop_backend": serve_backend,
                           "in_process_reference": None if backend is None else f"{kind} on {backend.device}"}
    tel_device = torch.device(device if torch.cuda.is_available() or not device.startswith("cuda") else "cpu")
    env = environment(tel_device)
    out_dir = Path(args.out) / target.gpu.name / target.precision.value
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    server, sigterm = None, signal.getsignal(signal.SIGTERM)
    written, wrong = [], []
    try:
        if served and not args.url:
            from .serving.render import render
            from .serving.server import Server

            def interrupt(signum, frame):  # SIGTERM stops the server like Ctrl-C (it runs in its own session)
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, interrupt)
            root = render(target.gpu.name, target.precision.value, checkpoint, backend=serve_backend, threads=threads)
            print(f"== starting tritonserver on {root}", file=sys.stderr)
            server = Server(root)
            server.start(timeout_s=args.server_timeout)
        url = args.url or (server.grpc_url if server else None)
        for sc in scenarios:
            sc = sc.fit(target.gpu, cfg, served=served)
            print(f"== {sc.name}: {sc.description}", file=sys.stderr)
            with Telemetry(tel_device) as tel:
                if served:
                    from .bench_triton import run_served_scenario

                    extra["triton"]["url"] = url
                    extra["triton"]["server"] = "external (--url)" if args.url else "started by dgemma bench"
                    res = run_served_scenario(url, tok, cfg, base, sc, seed=seed, reference=backend)
                    if not res["all_correct"]:
                        wrong.append(sc.name)
                else:
                    res = run_scenario(backend, cfg, base, sc, seed=seed)
            hbm = args.measured_gbs or target.gpu.hbm_gbs
            roof = roofline(cfg, target.precision, sc.prompt_tokens + sc.max_new_tokens // 2, hbm, sc.batch)
            m = res["metrics"]
            if m.get("denoise_ms_p50") and roof["step_floor_ms"] == roof["step_floor_ms"]:
                roof["measured_over_floor"] = m["denoise_ms_p50"] / roof["step_floor_ms"]
            record = {
                "schema": 1, "timestamp": stamp, "scenario": sc.__dict__, "gpu_profile": target.gpu.__dict__,
                "precision": target.precision.value, "backend": args.backend,
                "checkpoint": checkpoint or "tiny-default", "model": cfg.to_hf_dict()["text_config"] | {
                    "canvas_length": cfg.canvas_length, "param_count": cfg.param_count()},
                "environment": env, "telemetry": tel.summary(), "roofline": roof, **extra, **res,
            }
            written.append(_write(out_dir, f"{stamp}-{env['git_commit']}-{sc.name}-{args.backend}.json", record))
            print(_summary(sc.name, m, roof, res))
    finally:
        if server:
            server.stop()
        signal.signal(signal.SIGTERM, sigterm)
    for p in written:
        print(f"wrote {p}", file=sys.stderr)
    if wrong:
        print(f"error: wrong answers through Triton in {', '.join(wrong)} (see 'problems' in the results)",
              file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="run benchmark scenarios (bench/scenarios/*.toml), write JSON results")
    b.add_argument("--gpu", default="cpu")
    b.add_argument("--precision", default="bf16")
    b.add_argument("--scenario", default="anchor,adaptive", help="comma-separated names or .toml paths")
    b.add_argument("--backend", default="torch", help=" | ".join(BACKENDS) + " (ort reads build/onnx/<precision>, fp32 "
                   "on GPU=cpu; trt engines/<gpu>/<precision>; triton renders the repository and starts "
                   "tritonserver, or uses --url)")
    b.add_argument("--checkpoint", help="checkpoint dir, or 'synthetic' (default on a GPU profile, in-process only)")
    b.add_argument("--device", help="default: cuda for GPU profiles, cpu for 'cpu'")
    b.add_argument("--seed", default="0")
    b.add_argument("--measured-gbs", type=float, help="use a measured copy bandwidth for the roofline")
    b.add_argument("--onnx-dir", help="--backend ort: graphs directory (default build/onnx/<precision>)")
    b.add_argument("--url", help="--backend triton: gRPC host:port of a running server (default: start one)")
    b.add_argument("--serve-backend", choices=["ort", "torch", "bls"],
                   help="--backend triton: the canvas loop's backend (rendered, or what the --url server runs; "
                        "default ort on GPU=cpu, torch on GPU profiles); the in-process reference runs the same")
    b.add_argument("--no-reference", action="store_true",
                   help="--backend triton: skip in-process generation of the same prompts (no overhead ratio)")
    b.add_argument("--threads", type=int, help="CPU threads: torch here, ONNX Runtime intra-op (ort), the started "
                                               "server's canvas_loop (triton); default 1 on GPU=cpu")
    b.add_argument("--server-timeout", type=float, default=120.0, help="seconds to wait for tritonserver")
    b.add_argument("--out", default=str(ROOT / "bench" / "results"))
    b.set_defaults(func=cmd_bench)
