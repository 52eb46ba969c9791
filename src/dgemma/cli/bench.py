"""`dgemma bench` (`make bench`): scenarios on one backend (in-process torch/fast/ort/trt, or the served model
through Triton) -> one JSON result per scenario under bench/results/<gpu>/<precision>/ (dgemma.bench.runner)."""

from __future__ import annotations

import sys

from ..bench.runner import BACKENDS, BenchArgs, run
from .common import int_arg


def cmd_bench(args) -> int:
    seed = int_arg("--seed", args.seed, 0, 2**31 - 1)
    scenarios = tuple(s.strip() for s in args.scenario.split(",") if s.strip())
    out = run(BenchArgs(args.gpu, args.precision, args.backend, scenarios, args.checkpoint, args.device, seed,
                        args.measured_gbs, args.onnx_dir, args.url, args.metrics_url, args.serve_backend,
                        args.no_reference, args.threads, args.server_timeout, args.out))
    for p in out.written:
        print(f"wrote {p}", file=sys.stderr)
    if out.wrong:
        print(f"error: wrong answers through Triton in {', '.join(out.wrong)} (see 'problems' in the results)",
              file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="run benchmark scenarios (bench/scenarios/*.toml), write JSON results")
    b.add_argument("--gpu", default="cpu")
    b.add_argument("--precision", default="bf16")
    b.add_argument("--scenario", default="anchor,adaptive", help="comma-separated names or .toml paths")
    b.add_argument("--backend", default="torch", help=" | ".join(BACKENDS) + " (ort reads build/onnx/<precision>, "
                   "fp32 for bf16; trt engines/<gpu>/<precision>; triton renders the repository and starts "
                   "tritonserver, or uses --url)")
    b.add_argument("--checkpoint", help="checkpoint dir, or 'synthetic' (default on a GPU profile, in-process only)")
    b.add_argument("--device", help="default: cuda for GPU profiles, cpu for 'cpu'")
    b.add_argument("--seed", default="0")
    b.add_argument("--measured-gbs", type=float, help="use a measured copy bandwidth for the roofline")
    b.add_argument("--onnx-dir", help="--backend ort: graphs directory (default build/onnx/<precision>)")
    b.add_argument("--url", help="--backend triton: gRPC host:port of a running server (default: start one)")
    b.add_argument("--metrics-url", help="--backend triton with --url: its metrics endpoint, for the in-loop step "
                                         "time and batch sizes per concurrency level")
    b.add_argument("--serve-backend", choices=["ort", "torch", "bls"],
                   help="--backend triton: the canvas loop's backend (rendered, or what the --url server runs; "
                        "default ort on GPU=cpu, torch on GPU profiles); the in-process reference runs the same")
    b.add_argument("--no-reference", action="store_true",
                   help="--backend triton: skip in-process generation of the same prompts (no overhead ratio)")
    b.add_argument("--threads", type=int, help="CPU threads: torch here, ONNX Runtime intra-op (ort), the started "
                                               "server's canvas loop (triton); default 1 on GPU=cpu")
    b.add_argument("--server-timeout", type=float, default=120.0, help="seconds to wait for tritonserver")
    b.add_argument("--out", help="results root (default: bench/results in the work directory)")
    b.set_defaults(func=cmd_bench)
