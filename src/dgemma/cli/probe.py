"""`dgemma probe`: one bounded measuring run of the fast path (dgemma.bench.probe) on an H100/H200; `--device cpu
--tiny` runs its reduced form in seconds (tiny shapes, the kernels under the Triton interpreter)."""

from __future__ import annotations

import torch

from ..bench.probe import run, table


def cmd_probe(args) -> int:
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny GEMMs: thread hand-off dominates, and CPU runs are only smoke tests
    res = run(args)
    print(table(res))
    print(f"wrote {res['files']['json']} and {res['files']['csv']}")
    return 0 if all(p["status"] != "failed" for p in res["phases"].values()) else 1


def add_parser(sub) -> None:
    ap = sub.add_parser("probe", help="bounded GPU measuring run of the fast path: ceilings, kernels vs references, "
                                      "step / commit / prefill, anchor and batch-4 tok/s, FP8 vs W4A16")
    ap.add_argument("--precision", choices=("bf16", "fp8"), default="fp8", help="the main model's dense weights")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="TINY config (the CPU form)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget: phases that would overrun it are skipped (recorded with the reason)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results/probe/<stamp>-<gpu>)")
    ap.add_argument("--json", default=None, help="JSON path (the CSV lands beside it; default <out>/probe.json)")
    ap.set_defaults(func=cmd_probe)
