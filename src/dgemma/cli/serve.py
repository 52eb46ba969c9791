"""`dgemma serve` (`make serve`): render the repository and run tritonserver until Ctrl-C, every listener on
127.0.0.1 unless told otherwise, on Triton's usual ports (free ones for any that is busy)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from ..core.layout import current
from ..core.manifest import write_text_atomic
from ..serving.render import parse_gpus, render
from ..serving.server import LOOPBACK, TRITON_PORTS, Server, pick_ports
from .repo import add_render_args


def cmd_serve(args) -> int:
    def interrupt(signum, frame):  # SIGTERM stops it like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    root = render(args.gpu, args.precision, args.checkpoint, backend=args.backend, engine=args.engine,
                  max_batch=args.max_batch, ensemble=args.ensemble, gpus=parse_gpus(args.gpus) if args.gpus else None)
    srv = Server(root, http_address=args.http_address, grpc_address=args.grpc_address,
                 metrics_address=args.metrics_address)
    if srv.http_address != LOOPBACK:
        print(f"warning: Triton's HTTP endpoint listens on {srv.http_address}: tritonserver 2.51 crashes on a deeply "
              "nested JSON body sent there; put `dgemma openai` in front instead (README, Security)", file=sys.stderr)
    ports, notes = pick_ports({"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port})
    for note in notes:
        print(note, file=sys.stderr)
    srv.http_port, srv.grpc_port, srv.metrics_port = ports["http"], ports["grpc"], ports["metrics"]
    try:
        srv.start(timeout_s=args.timeout)
    except KeyboardInterrupt:
        srv.stop()
        raise
    print(f"tritonserver pid {srv.proc.pid} ready: grpc {srv.grpc_url}  http {srv.http_url}  "
          f"metrics {srv.metrics_url}  (log {srv.log_path}); Ctrl-C stops it", flush=True)
    # where to connect, written once the server is ready: for scripts (make demo) and `dgemma client` / `dgemma
    # openai` without --url when 8001 was busy
    ready = Path(args.ready_file) if args.ready_file else current().serve_ready_file
    write_text_atomic(ready, json.dumps({"pid": srv.proc.pid, "grpc": srv.grpc_url, "http": srv.http_url,
                                         "metrics": srv.metrics_url, "log": str(srv.log_path)}))
    try:
        while srv.proc.poll() is None:
            time.sleep(0.5)
        print(f"tritonserver exited with code {srv.proc.returncode}; log {srv.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping tritonserver", file=sys.stderr)
        srv.stop()
        return 0
    finally:
        if not args.ready_file:
            ready.unlink(missing_ok=True)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="render the Triton repository and run tritonserver on 127.0.0.1")
    add_render_args(s)
    s.add_argument("--http-port", type=int, default=TRITON_PORTS["http"],
                   help="default 8000 (Triton's usual ports; a busy one is replaced by a free one, and said so; 0: free)")
    s.add_argument("--grpc-port", type=int, default=TRITON_PORTS["grpc"], help="default 8001")
    s.add_argument("--metrics-port", type=int, default=TRITON_PORTS["metrics"], help="default 8002")
    s.add_argument("--http-address", default=LOOPBACK,
                   help="where Triton's HTTP endpoint listens (default 127.0.0.1). Exposing it is at your risk: "
                        "tritonserver 2.51 crashes on a deeply nested JSON body; expose `dgemma openai` instead")
    s.add_argument("--grpc-address", default=LOOPBACK, help="where Triton's gRPC endpoint listens (default 127.0.0.1)")
    s.add_argument("--metrics-address", default=LOOPBACK, help="where the metrics endpoint listens (default 127.0.0.1)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    s.add_argument("--ready-file", help="write {pid, grpc, http, metrics, log} as JSON here once ready (default "
                                        "build/serve.json in the work directory, removed on exit)")
    s.set_defaults(func=cmd_serve)
