"""`dgemma generate`: one prompt through the canvas sampler on any backend (torch, fast, ort, trt), streamed or
as JSON."""

from __future__ import annotations

import json
import sys
import time

import torch

from ..core.errors import ConfigError
from ..generation.infill import infill_template
from ..generation.sampler import generate
from ..runtime.factory import KINDS, create
from .common import CHECKPOINT_OR_SYNTHETIC_HELP, int_arg

IN_PROCESS = tuple(k for k in KINDS if k != "bls")


def cmd_generate(args) -> int:
    seed = int_arg("--seed", args.seed, 0, 2**63 - 1, " Pass a whole number such as --seed 1234.")
    seed = 0 if seed is None else seed
    max_context = int_arg("--max-context", args.max_context, 1)
    if args.backend not in IN_PROCESS:
        raise ConfigError(f"unknown backend {args.backend!r}; valid: {', '.join(IN_PROCESS)} (bench also has triton).")
    eng = create(args.backend, args.precision, args.gpu, args.checkpoint, device=args.device, dtype=args.dtype,
                 max_context=max_context)
    cfg, sampler, tok, backend = eng.config, eng.sampler, eng.tokenizer, eng.backend
    max_steps = sampler.max_denoising_steps
    steps = int_arg("--steps", args.steps, 1, max_steps,
                    f" The checkpoint's generation_config.json sets max_denoising_steps={max_steps}.")
    max_new = int_arg("--max-new-tokens", args.max_new_tokens, 1, None,
                      f" Output comes in whole canvases of {cfg.canvas_length} tokens.")
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
    prompt = torch.tensor([ids], dtype=torch.int64, device=backend.device)

    def on_step(ev):
        print(f"\r  canvas {ev.canvas + 1} step {ev.step:2d}/{sampler.max_denoising_steps} "
              f"mean entropy {float(ev.mean_entropy[0]):.4f}", end="", file=sys.stderr, flush=True)

    def on_canvas(i, committed):
        print(file=sys.stderr)
        text = tok.decode(committed[0].tolist()) if tok else committed[0].tolist()
        print(f"[canvas {i + 1}] {text}", flush=True)

    top = None
    if args.logprobs is not None:
        top = int_arg("--logprobs", args.logprobs, 0, 5, " K = how many alternatives per token (0: none).")
    t0 = time.perf_counter()
    res = generate(backend, prompt, sampler, torch.Generator(device=backend.device).manual_seed(seed),
                   on_step=on_step if args.stream else None, on_canvas=on_canvas if args.stream else None,
                   template=None if template is None else template.to(backend.device), logprobs=top)
    dt = time.perf_counter() - t0
    new = res.new_tokens[0].tolist()
    text = tok.decode(new) if tok else ""
    out = {
        "token_ids": new, "text": text, "canvases": res.canvases, "steps_per_canvas": res.steps_per_canvas,
        "tokens_per_forward": round(float(res.tokens_per_forward[0]), 4), "prompt_ids": ids, "seed": seed,
        "seconds": round(dt, 4), "denoiser_steps": int(sum(res.steps_per_canvas)),
    }
    if top is not None:
        out["logprobs"] = logprob_rows(res, tok, top, () if sampler.ignore_eos else sampler.eos_token_ids)
    if args.json:
        print(json.dumps(out))
    elif not args.stream:
        print(text if tok else new)
        print(f"-- {res.canvases} canvas(es), steps per canvas {res.steps_per_canvas}, "
              f"tokens per forward {out['tokens_per_forward']}, {dt:.2f} s", file=sys.stderr)
    else:
        print(f"-- steps per canvas {res.steps_per_canvas}, tokens per forward {out['tokens_per_forward']}, "
              f"{dt:.2f} s", file=sys.stderr)
    if top is not None and not args.json:
        print_logprobs(out["logprobs"])
    return 0


def logprob_rows(res, tok, top: int, eos: tuple[int, ...]) -> list[dict]:
    """Per new token up to the first EOS (the pads after it left out): its id, text and log-probability under the
    denoising step that fixed it, and the `top` most likely alternatives there."""
    rows = []
    for j, t in enumerate(res.new_tokens[0].tolist()):
        if rows and rows[-1]["token_id"] in eos:
            break
        row = {"token_id": t, "token": tok.decode([t]) if tok else None, "logprob": float(res.logprobs[0, j])}
        if top:
            row["top"] = [{"token_id": int(i), "token": tok.decode([int(i)]) if tok else None, "logprob": float(v)}
                          for i, v in zip(res.top_ids[0, j].tolist(), res.top_logprobs[0, j].tolist())]
        rows.append(row)
    return rows


def print_logprobs(rows: list[dict]) -> None:
    print("-- logprobs (token, log-probability, alternatives):")
    for r in rows:
        alts = "  ".join(f"{a['token']!r} {a['logprob']:.4f}" for a in r.get("top", []))
        print(f"  {r['token']!r:>12} {r['logprob']:10.4f}   {alts}")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate with the canvas sampler")
    g.add_argument("--checkpoint", help=CHECKPOINT_OR_SYNTHETIC_HELP)
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
    g.add_argument("--logprobs", nargs="?", const="0", default=None, metavar="K",
                   help="print each new token's log-probability under the step that fixed it, and the K (0..5) most "
                        "likely alternatives")
    g.add_argument("--infill", help="canvas template: '_' = one hole token, other text stays fixed at every step")
    g.add_argument("--backend", default="torch",
                   help="torch | fast | ort (reads build/onnx/<precision>, fp32 for bf16) | trt (reads "
                        "engines/<gpu>/<precision>)")
    g.add_argument("--gpu", help="GPU profile of the trt engines (default: this machine's GPU, else cpu)")
    g.add_argument("--precision", default="bf16",
                   help="bf16 | fp8 (fast, ort, trt) | nvfp4 (trt) | fp32 (ort reference graphs)")
    g.set_defaults(func=cmd_generate)
