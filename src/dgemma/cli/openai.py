"""`dgemma openai` (`make openai`): the OpenAI-compatible HTTP API (dgemma.serving.openai_api) in front of a
running Triton `dgemma` model, on 127.0.0.1 by default."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from ..core.errors import ConfigError
from ..serving.client import default_grpc_url
from ..serving.openai_api.body import MAX_BODY_BYTES
from ..serving.openai_api.service import serve


def cmd_openai(args) -> int:
    args.url = args.url or default_grpc_url()
    args.api_key = args.api_key or os.environ.get("DGEMMA_API_KEY") or None
    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be at least 1024 (got {args.max_body_bytes}).")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key (--api-key or DGEMMA_API_KEY)", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args, say=lambda s: print(s, flush=True)))
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub) -> None:
    o = sub.add_parser("openai", help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                                      "/v1/models) in front of Triton's dgemma model")
    o.add_argument("--url", help="Triton gRPC host:port (default: 127.0.0.1:8001, else the one `dgemma serve` "
                                 "wrote to build/serve.json)")
    o.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    o.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000, as Triton's own "
                                                          "OpenAI frontend; 0: a free one)")
    o.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (default: env DGEMMA_API_KEY)")
    o.add_argument("--checkpoint", help="tokenizer and chat template (default: the checkpoint the dgemma model "
                                        "was rendered with, else the embedded tiny model)")
    o.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest request body accepted (default {MAX_BODY_BYTES}); larger ones get 413")
    o.add_argument("--model-name", default="dgemma", help="the model id clients send (default dgemma)")
    o.add_argument("--triton-metrics", help="Triton's metrics URL, named on /metrics for the dgemma_* series")
    o.add_argument("--wait", type=float, default=120.0, help="seconds to wait for Triton at startup")
    o.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    o.set_defaults(func=cmd_openai)
