"""`dgemma` command line: one subcommand per pipeline stage. Parses flags, calls stage functions,
prints results. User errors (DgemmaError) print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, DgemmaError

SYNTHETIC = "synthetic"


def _int_arg(name: str, value, lo: int | None = None, hi: int | None = None, fix: str = "") -> int | None:
    if value is None:
        return None
    try:
        v = int(str(value), 10)
    except ValueError:
        raise ConfigError(f"{name} must be an integer (got {value!r}).{fix}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be {rng} (got {v}).{fix}")
    return v


def load_model(checkpoint: str | None, device: str, dtype: str | None):
    """-> (model, model config, sampler defaults, tokenizer or None)."""
    from .checkpoint import load_checkpoint
    from .config import FULL_SIZE, SamplerConfig
    from .model import DiffusionGemma
    from .tiny import ensure_tiny
    from .tokens import Tokenizer

    if checkpoint == SYNTHETIC:
        model = DiffusionGemma.random(FULL_SIZE, device=device, dtype=dtype or "bfloat16")
        return model, FULL_SIZE, SamplerConfig(), None
    path = Path(checkpoint) if checkpoint else ensure_tiny()
    ck = load_checkpoint(path, device=device, dtype=dtype)
    tok = Tokenizer(path) if (path / "tokenizer.json").exists() else None
    return ck.model, ck.config, ck.sampler, tok


def cmd_generate(args) -> int:
    import torch

    from .sampler import generate

    seed = _int_arg("--seed", args.seed, 0, 2**63 - 1, " Pass a whole number such as --seed 1234.")
    seed = 0 if seed is None else seed
    model, cfg, sampler, tok = load_model(args.checkpoint, args.device, args.dtype)
    max_steps = sampler.max_denoising_steps
    steps = _int_arg("--steps", args.steps, 1, max_steps,
                     f" The checkpoint's generation_config.json sets max_denoising_steps={max_steps}.")
    max_new = _int_arg("--max-new-tokens", args.max_new_tokens, 1, None,
                       f" Output comes in whole canvases of {cfg.canvas_length} tokens.")
    max_context = _int_arg("--max-context", args.max_context, 1, cfg.max_position_embeddings)
    over = {}
    if steps is not None:
        over["max_denoising_steps"] = steps
    if max_new is not None:
        over["max_new_tokens"] = max_new
    if args.fixed_steps:
        over["adaptive_stopping"] = False
    sampler = sampler.replace(**over)
    template = None
    if args.infill is not None:
        if tok is None:
            raise ConfigError("--infill needs a checkpoint with a tokenizer.json.")
        template = infill_template(tok, args.infill, cfg.canvas_length, sampler.max_new_tokens)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers (got {args.prompt_ids!r}).") from None
    else:
        if tok is None:
            raise ConfigError("this checkpoint has no tokenizer.json; pass --prompt-ids instead of --prompt.")
        ids = tok.encode_chat(args.prompt or "")
    if not ids:
        raise ConfigError("the prompt is empty; pass --prompt TEXT or --prompt-ids 2,105,...")
    backend = make_backend(args.backend, model, args.precision, max_context, gpu=args.gpu)
    prompt = torch.tensor([ids], dtype=torch.int64, device=backend.device)

    def on_step(ev):
        print(f"\r  canvas {ev.canvas + 1} step {ev.step:2d}/{sampler.max_denoising_steps} "
              f"mean entropy {float(ev.mean_entropy[0]):.4f}", end="", file=sys.stderr, flush=True)

    def on_canvas(i, committed):
        print(file=sys.stderr)
        text = tok.decode(committed[0].tolist()) if tok else committed[0].tolist()
        print(f"[canvas {i + 1}] {text}", flush=True)

    t0 = time.perf_counter()
    res = generate(backend, prompt, sampler, torch.Generator(device=backend.device).manual_seed(seed),
                   on_step=on_step if args.stream else None, on_canvas=on_canvas if args.stream else None,
                   template=None if template is None else template.to(backend.device))
    dt = time.perf_counter() - t0
    new = res.new_tokens[0].tolist()
    text = tok.decode(new) if tok else ""
    out = {
        "token_ids": new, "text": text, "canvases": res.canvases, "steps_per_canvas": res.steps_per_canvas,
        "tokens_per_forward": round(float(res.tokens_per_forward[0]), 4), "prompt_ids": ids, "seed": seed,
        "seconds": round(dt, 4), "denoiser_steps": int(sum(res.steps_per_canvas)),
    }
    if args.json:
        print(json.dumps(out))
    elif not args.stream:
        print(text if tok else new)
        print(f"-- {res.canvases} canvas(es), steps per canvas {res.steps_per_canvas}, "
              f"tokens per forward {out['tokens_per_forward']}, {dt:.2f} s", file=sys.stderr)
    else:
        print(f"-- steps per canvas {res.steps_per_canvas}, tokens per forward {out['tokens_per_forward']}, "
              f"{dt:.2f} s", file=sys.stderr)
    return 0


def infill_template(tok, text: str, canvas: int, max_new_tokens: int):
    """'1 _ 3 _' -> [1, k*C] ids with -1 holes: every '_' is one hole token, other text is fixed tokens;
    the rest of the last canvas is holes."""
    import math

    import torch

    ids: list[int] = []
    for i, part in enumerate(text.split("_")):
        if i:
            ids.append(-1)
        ids += tok.encode(part) if part else []
    k = max(1, math.ceil(len(ids) / canvas), math.ceil(max_new_tokens / canvas))
    if len(ids) > k * canvas:
        raise ConfigError(f"--infill template has {len(ids)} tokens; {k} canvas(es) hold {k * canvas}.")
    return torch.tensor([ids + [-1] * (k * canvas - len(ids))], dtype=torch.int64)


def cmd_train_tiny(args) -> int:
    from .train import train_tiny

    steps = _int_arg("--steps", args.steps, 1, None)
    seed = _int_arg("--seed", args.seed, 0, 2**63 - 1)
    res = train_tiny(args.out_dir, steps=steps, batch=_int_arg("--batch", args.batch, 1, None), seed=seed,
                     time_budget_s=float(args.time_budget) if args.time_budget else None)
    tail = res["losses"][-20:]
    print(f"trained {res['steps']} steps in {res['seconds']:.0f} s; loss {res['losses'][0]:.3f} -> "
          f"{sum(tail) / len(tail):.4f}; wrote {args.out_dir}")
    return 0


def cmd_eval(args) -> int:
    from .tiny import DEFAULT_CHECKPOINT
    from .train import evaluate

    ck = args.checkpoint or DEFAULT_CHECKPOINT
    n = _int_arg("--n", args.n, 1, None)
    steps = _int_arg("--steps", args.steps, 1, 48)
    backend = None
    if args.backend != "torch" or args.precision != "bf16":
        from .checkpoint import load_checkpoint

        backend = make_backend(args.backend, load_checkpoint(ck).model, args.precision, 256)
    res = evaluate(ck, task=args.task, n=n, steps=steps, fixed_steps=args.fixed_steps, backend=backend)
    res.update(backend=args.backend, precision=args.precision, checkpoint=str(ck))
    print(json.dumps(res) if args.json else
          f"{res['task']}: accuracy {res['accuracy']:.2%} on {res['n']} held-out, steps/canvas "
          f"{res['mean_steps_per_canvas']:.2f}, tokens/forward {res['tokens_per_forward']:.2f} "
          f"({'fixed' if not res['adaptive'] else 'adaptive'}, max {res['max_denoising_steps']} steps, "
          f"{args.backend}/{args.precision})")
    return 0


def cmd_init_tiny(args) -> int:
    from .tiny import write_tiny

    seed = _int_arg("--seed", args.seed, 0, 2**63 - 1) or 0
    path = write_tiny(args.out_dir, seed=seed)
    print(f"wrote tiny DiffusionGemma checkpoint to {path}")
    return 0


def make_backend(name: str, model, precision: str, max_context: int | None, gpu: str | None = None):
    """Backend by name; `fast` is the CUDA-graph/FP8 path (falls back to eager code on CPU); `trt` runs the
    engines in engines/<gpu>/<precision>/ (gpu: the profile; default: this machine's GPU, else cpu)."""
    from .runtime.torch_backend import TorchBackend

    if name == "torch":
        if precision not in ("bf16",) and model.device.type == "cuda":
            raise ConfigError(f"backend 'torch' runs the checkpoint's own dtype; precision {precision!r} needs "
                              "--backend fast (FP8 weights) or an engine backend.")
        return TorchBackend(model, max_context=max_context)
    if name == "fast":
        from .runtime.fast import FastBackend, quantize_fp8_

        if precision == "fp8":
            quantize_fp8_(model)
        elif precision == "nvfp4":
            raise ConfigError("backend 'fast' has no NVFP4 kernels (Hopper has no FP4 tensor cores); use fp8.")
        return FastBackend(model, max_context=max_context)
    if name == "ort":
        from .runtime.ort_backend import OrtBackend

        return OrtBackend(Path(__file__).resolve().parents[2] / "build" / "onnx" / precision, cfg=model.cfg,
                          max_context=max_context)
    if name == "trt":
        import torch

        from .bench_cli import trt_backend
        from .profiles import for_device, resolve

        if gpu is None:
            gpu = for_device(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
        return trt_backend(resolve(gpu, precision), max_context)
    raise ConfigError(f"unknown backend {name!r}; valid: torch, fast, ort, trt (bench also has triton).")


def cmd_report(args) -> int:
    from .report import RESULTS, REPORTS, comparison_report, gpu_report

    results, out = Path(args.results or RESULTS), Path(args.out or REPORTS)
    if args.gpu:
        from .profiles import resolve

        t = resolve(args.gpu, args.precision)
        path = gpu_report(t.gpu.name, t.precision.value, results, out)
    else:
        path = comparison_report(results, out)
    print(f"wrote {path}")
    return 0


def cmd_profiles(args) -> int:
    from .profiles import describe

    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma deployment toolkit.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate with the canvas sampler")
    g.add_argument("--checkpoint", help=f"checkpoint dir (default: the embedded trained tiny model), or "
                                        f"'{SYNTHETIC}' (full size, random weights)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="user message; rendered with the Gemma chat template")
    src.add_argument("--prompt-ids", help="raw prompt token ids, comma-separated (no template)")
    g.add_argument("--max-new-tokens", help="tokens to generate (rounded up to whole canvases)")
    g.add_argument("--steps", help="max denoising steps per canvas (1..generation_config's maximum)")
    g.add_argument("--fixed-steps", action="store_true", help="always run --steps steps (no adaptive stopping)")
    g.add_argument("--seed", help="RNG seed (same tokens as torch.manual_seed(S) + transformers generate on CPU)")
    g.add_argument("--stream", action="store_true", help="print each canvas as it commits and a step indicator")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's dtype")
    g.add_argument("--max-context", help="KV buffer capacity in tokens (prompt + output)")
    g.add_argument("--infill", help="canvas template: '_' = one hole token, other text stays fixed at every step")
    g.add_argument("--backend", default="torch",
                   help="torch | fast | ort (reads build/onnx/<precision>) | trt (reads engines/<gpu>/<precision>)")
    g.add_argument("--gpu", help="GPU profile of the trt engines (default: this machine's GPU, else cpu)")
    g.add_argument("--precision", default="bf16", help="bf16 | fp8 (fast, ort, trt) | nvfp4 (trt) | fp32 (ort reference graphs)")
    g.set_defaults(func=cmd_generate)

    from . import bench_cli

    bench_cli.add_parsers(sub)

    r = sub.add_parser("report", help="markdown + plots from bench results (one GPU, or all of them)")
    r.add_argument("--gpu")
    r.add_argument("--precision", default="bf16")
    r.add_argument("--results", help="results dir (default bench/results)")
    r.add_argument("--out", help="reports dir (default bench/reports)")
    r.set_defaults(func=cmd_report)

    pr = sub.add_parser("profiles", help="list GPU profiles and what each supports")
    pr.set_defaults(func=cmd_profiles)

    tt = sub.add_parser("train-tiny", help="train the tiny DiffusionGemma (sorting) on CPU, write a checkpoint")
    tt.add_argument("out_dir")
    tt.add_argument("--steps", default="1300")
    tt.add_argument("--batch", default="64")
    tt.add_argument("--seed", default="0")
    tt.add_argument("--time-budget", help="stop after this many seconds (then the step count is not deterministic)")
    tt.set_defaults(func=cmd_train_tiny)

    ev = sub.add_parser("eval", help="task accuracy, steps per canvas, tokens per forward on a held-out set")
    ev.add_argument("--task", default="sort")
    ev.add_argument("--checkpoint", help="default: the embedded trained tiny model")
    ev.add_argument("--n", default="100")
    ev.add_argument("--steps", help="max denoising steps (default: generation_config)")
    ev.add_argument("--fixed-steps", action="store_true")
    ev.add_argument("--backend", default="torch")
    ev.add_argument("--precision", default="bf16")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    from . import engine_build, export

    export.add_parsers(sub)
    engine_build.add_parsers(sub)

    from . import client
    from .serving import loadtest, render, server

    render.add_parsers(sub)
    server.add_parsers(sub)
    client.add_parsers(sub)
    loadtest.add_parsers(sub)

    t = sub.add_parser("init-tiny", help="write the tiny random DiffusionGemma checkpoint (real layout)")
    t.add_argument("out_dir")
    t.add_argument("--seed", default="0")
    t.set_defaults(func=cmd_init_tiny)

    from .quant import add_parser as add_quantize_parser

    add_quantize_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DgemmaError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
