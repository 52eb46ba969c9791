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
    import torch

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
    torch.set_grad_enabled(False)
    return ck.model, ck.config, ck.sampler, tok


def cmd_generate(args) -> int:
    import torch

    from .runtime.torch_backend import TorchBackend
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
    backend = TorchBackend(model, max_context=max_context)
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
                   on_step=on_step if args.stream else None, on_canvas=on_canvas if args.stream else None)
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


def cmd_init_tiny(args) -> int:
    from .tiny import write_tiny

    seed = _int_arg("--seed", args.seed, 0, 2**63 - 1) or 0
    path = write_tiny(args.out_dir, seed=seed)
    print(f"wrote tiny DiffusionGemma checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma deployment toolkit.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate with the canvas sampler")
    g.add_argument("--checkpoint", help=f"checkpoint dir (default: the tiny default), or '{SYNTHETIC}' (full size, "
                                        "random weights)")
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
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("init-tiny", help="write the tiny random DiffusionGemma checkpoint (real layout)")
    t.add_argument("out_dir")
    t.add_argument("--seed", default="0")
    t.set_defaults(func=cmd_init_tiny)
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
