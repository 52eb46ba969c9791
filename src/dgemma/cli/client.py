"""`dgemma client`: a prompt to the Triton `dgemma` model over gRPC (streamed, with drafts), or the server's
health and batch statistics."""

from __future__ import annotations

import json
import sys

from ..core.errors import DgemmaError
from ..serving.client import ServerError, default_grpc_url, health, request, stats


def cmd_client(args) -> int:
    args.url = args.url or default_grpc_url()
    if args.stats:
        s = stats(args.url)
        if args.json:
            print(json.dumps(s))
        else:
            for m, v in s.items():
                sizes = ", ".join(f"{n}x{k}" for k, n in sorted(v["batches"].items())) or "-"
                print(f"{m:<9} {v['requests']:6d} requests {v['executions']:6d} executions  batch sizes: {sizes}")
        return 0
    if args.health:
        h = health(args.url)
        print(json.dumps(h) if args.json else
              f"{args.url}: live={h['live']} ready={h['ready']} " + " ".join(f"{k}={v}" for k, v in h["models"].items()))
        return 0 if h["ready"] else 1
    if args.prompt is None:
        raise DgemmaError("pass --prompt TEXT (or --health).")
    params = {"max_tokens": args.max_tokens, "seed": args.seed, "stream": True if args.stream else None,
              "max_denoising_steps": args.steps, "entropy_bound": args.entropy_bound, "infill": args.infill,
              "ignore_eos": True if args.ignore_eos else None, "temperature_min": args.t_min,
              "temperature_max": args.t_max, "adaptive_stopping": False if args.fixed_steps else None,
              "stream_drafts": True if args.drafts else None}
    if args.drafts and not args.stream:
        raise DgemmaError("--drafts streams a draft per denoising step; add --stream.")
    try:
        responses = request(args.url, args.prompt, model=args.model, **params)
    except ServerError:
        raise
    except Exception as e:
        raise ServerError(f"request to {args.url} failed ({e}). Is the server up? dgemma client --health") from None
    if args.json:
        print(json.dumps(responses if args.stream else responses[-1]))
    elif args.stream:
        for r in responses:
            if r["is_draft"]:
                print(f"  (draft {r['canvas_index'] + 1}.{r['steps_per_canvas'][-1]}) {r['text_output']}", flush=True)
            elif r["text_output"]:
                print(f"[canvas {r['canvas_index'] + 1}] {r['text_output']}", flush=True)
        last = responses[-1]
        print(f"-- steps per canvas {last['steps_per_canvas']}, tokens per forward {last['tokens_per_forward']}",
              file=sys.stderr)
    else:
        print(responses[-1]["text_output"])
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("client", help="send a prompt to the Triton `dgemma` model over gRPC (or --health, --stats)")
    c.add_argument("--url", help="gRPC host:port (dgemma serve prints it; default 127.0.0.1:8001, else the "
                                 "address a running `dgemma serve` wrote to build/serve.json)")
    c.add_argument("--prompt")
    c.add_argument("--health", action="store_true", help="server and model readiness")
    c.add_argument("--stats", action="store_true",
                   help="per model: requests, executions, batch sizes (executions x size) from Triton's statistics")
    c.add_argument("--stream", action="store_true", help="one response per committed canvas")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--steps", type=int, help="max_denoising_steps")
    c.add_argument("--entropy-bound", type=float)
    c.add_argument("--infill")
    c.add_argument("--ignore-eos", action="store_true", help="always fill max_tokens (benchmarks)")
    c.add_argument("--t-min", type=float, help="temperature_min of the denoising schedule")
    c.add_argument("--t-max", type=float, help="temperature_max of the denoising schedule")
    c.add_argument("--fixed-steps", action="store_true", help="adaptive_stopping=false: always --steps steps")
    c.add_argument("--drafts", action="store_true", help="with --stream: also print each denoising step's draft")
    c.add_argument("--model", default="dgemma")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_client)
