"""`dgemma report` (`make report`): the report of one GPU and precision (markdown + plots), or with no --gpu the
table across every result."""

from __future__ import annotations

from pathlib import Path

from ..bench.report import comparison_report, gpu_report
from ..core.layout import current
from ..core.profiles import resolve


def cmd_report(args) -> int:
    layout = current()
    results = Path(args.results) if args.results else layout.results
    out = Path(args.out) if args.out else layout.reports
    if args.gpu:
        t = resolve(args.gpu, args.precision)
        path = gpu_report(t.gpu.name, t.precision.value, results, out)
    else:
        path = comparison_report(results, out)
    print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="markdown + plots from bench results (one GPU, or all of them)")
    r.add_argument("--gpu", help="the report of this GPU profile (default: the table across every result)")
    r.add_argument("--precision", default="bf16")
    r.add_argument("--results", help="results dir (default bench/results in the work directory)")
    r.add_argument("--out", help="reports dir (default bench/reports in the work directory)")
    r.set_defaults(func=cmd_report)
