"""The OpenAI server's process side: wait for Triton and the dgemma model, load the tokenizer, then serve the app
with uvicorn (`serve`, what `dgemma openai` runs) and print the base URL; `start_in_thread` runs the same server in
a background thread (tests, measurements)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from ...core.errors import ConfigError, DgemmaError
from ...core.layout import DEFAULT_CHECKPOINT
from ...model.tokens import Tokenizer
from .app import ServerConfig, create_app
from .body import MAX_BODY_BYTES
from .triton import TritonBridge

log = logging.getLogger("dgemma.openai")


def load_tokenizer(checkpoint: str | None, info) -> tuple[object, str]:
    """--checkpoint, else the checkpoint the dgemma model was rendered with (its config parameter), else the
    embedded tiny model; -> (Tokenizer, where it came from)."""
    if checkpoint:
        if not (Path(checkpoint) / "tokenizer.json").exists():
            raise ConfigError(f"--checkpoint {checkpoint} has no tokenizer.json.")
        return Tokenizer(checkpoint), f"--checkpoint {checkpoint}"
    rendered = info.param("checkpoint") if info else None
    if rendered and (Path(rendered) / "tokenizer.json").exists():
        return Tokenizer(rendered), f"the model's checkpoint {rendered}"
    why = f"the model's checkpoint {rendered} is not readable here" if rendered else "the model names no checkpoint"
    return Tokenizer(DEFAULT_CHECKPOINT), f"the embedded tiny model ({why}; pass --checkpoint)"


async def prepare(url: str, checkpoint: str | None, model: str = "dgemma", wait_s: float = 120.0, say=print):
    """-> (bridge with ModelInfo, tokenizer, source): waits up to wait_s for Triton and the model."""
    bridge = TritonBridge(url, model)
    deadline, told = time.monotonic() + wait_s, False
    while not await bridge.ready():
        if time.monotonic() > deadline:
            await bridge.close()
            raise DgemmaError(f"no ready `{model}` model at Triton gRPC {url} after {wait_s:.0f} s. Start one with "
                              "`dgemma serve` (or make serve) and pass its gRPC address as --url.")
        if not told:
            say(f"waiting for Triton at {url} and its {model} model ...")
            told = True
        await asyncio.sleep(0.5)
    info = await bridge.load_info()
    tok, source = load_tokenizer(checkpoint, info)
    return bridge, tok, source


def _uvicorn_config(app, host: str, port: int, access_log: bool):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log, server_header=False,
                          timeout_keep_alive=5, lifespan="on")


def base_url(server) -> str:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return f"http://{host}:{port}/v1"


async def serve(args, say=print) -> None:
    import uvicorn

    bridge, tok, source = await prepare(args.url, args.checkpoint, wait_s=args.wait)
    say(f"tokenizer and chat template: {source}")
    cfg = ServerConfig(model_name=args.model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                       triton_metrics=args.triton_metrics or "")
    server = uvicorn.Server(_uvicorn_config(create_app(bridge, tok, cfg), args.host, args.port, args.access_log))
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        say(f"OpenAI API ready: {base_url(server)}  (Triton gRPC {args.url}; "
            f"{'API key required' if args.api_key else 'no API key'}); Ctrl-C stops it")
    await task


class Running:
    """A server started by start_in_thread: base_url, loop, app, stop()."""

    def __init__(self):
        self.base_url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)


def start_in_thread(url: str, checkpoint: str | None = None, api_key: str | None = None, port: int = 0,
                    max_body_bytes: int = MAX_BODY_BYTES, model_name: str = "dgemma",
                    timeout_s: float = 60.0) -> Running:
    """The server on 127.0.0.1:port (0: a free one) in a daemon thread with its own event loop."""
    import uvicorn

    run = Running()

    async def main():
        run.loop = asyncio.get_running_loop()
        bridge, tok, _ = await prepare(url, checkpoint, model_name, wait_s=timeout_s, say=lambda s: None)
        cfg = ServerConfig(model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes)
        config = _uvicorn_config(create_app(bridge, tok, cfg), "127.0.0.1", port, access_log=False)
        run.server = uvicorn.Server(config)
        run.server.config.install_signal_handlers = False  # not the main thread
        await run.server.serve()

    def target():
        try:
            asyncio.run(main())
        except BaseException as e:  # reported to the starter below
            run.error = e

    run.thread = threading.Thread(target=target, daemon=True, name="dgemma-openai")
    run.thread.start()
    deadline = time.monotonic() + timeout_s
    while not (run.server is not None and run.server.started):
        if run.error is not None or not run.thread.is_alive():
            raise DgemmaError(f"the OpenAI server did not start: {run.error!r}")
        if time.monotonic() > deadline:
            run.stop()
            raise DgemmaError(f"the OpenAI server did not start within {timeout_s:.0f} s")
        time.sleep(0.05)
    run.base_url = base_url(run.server)
    return run
