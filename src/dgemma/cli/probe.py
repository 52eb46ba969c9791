"""`dgemma probe`: the GPU probe of the fast path (dgemma.bench.probe); `--device cpu --tiny` runs it in seconds."""

from __future__ import annotations

import torch

from ..bench.probe import run, table
from ..core.manifest import write_json_atomic


def cmd_probe(args) -> int:
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny GEMMs: thread hand-off dominates, and CPU runs are only smoke tests
    res = run(args)
    print(table(res))
    if args.json:
        write_json_atomic(args.json, res, indent=2)
    return 0


def add_parser(sub) -> None:
    ap = sub.add_parser("probe", help="GPU probe of the fast path (step, commit, breakdown, tok/s, agreement)")
    ap.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--fp8-lm-head", action="store_true", help="fp8 copies of the tied embedding for head/soft GEMMs")
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--canvases", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="TINY config (CPU smoke test)")
    ap.add_argument("--json", default=None)
    ap.set_defaults(func=cmd_probe)
