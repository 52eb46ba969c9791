"""`dgemma serve` (`make serve`): render the repository and run tritonserver on 127.0.0.1 until Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from ..serving.render import render
from ..serving.server import Server
from .repo import add_render_args


def cmd_serve(args) -> int:
    def interrupt(signum, frame):  # SIGTERM stops it like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    root = render(args.gpu, args.precision, args.checkpoint, backend=args.backend, engine=args.engine,
                  max_batch=args.max_batch)
    srv = Server(root)
    if args.http_port:
        srv.http_port, srv.grpc_port, srv.metrics_port = args.http_port, args.grpc_port, args.metrics_port
    try:
        srv.start(timeout_s=args.timeout)
    except KeyboardInterrupt:
        srv.stop()
        raise
    print(f"tritonserver pid {srv.proc.pid} ready: grpc {srv.grpc_url}  http {srv.http_url}  "
          f"metrics {srv.metrics_url}  (log {srv.log_path}); Ctrl-C stops it", flush=True)
    if args.ready_file:  # for scripts (make demo): where to connect, written once the server is ready
        Path(args.ready_file).write_text(json.dumps({"pid": srv.proc.pid, "grpc": srv.grpc_url, "http": srv.http_url,
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


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="render the Triton repository and run tritonserver on 127.0.0.1")
    add_render_args(s)
    s.add_argument("--http-port", type=int, default=0, help="default: free ports")
    s.add_argument("--grpc-port", type=int, default=0)
    s.add_argument("--metrics-port", type=int, default=0)
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    s.add_argument("--ready-file", help="write {pid, grpc, http, metrics, log} as JSON here once ready")
    s.set_defaults(func=cmd_serve)
