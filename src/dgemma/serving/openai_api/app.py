"""The ASGI app (Starlette): routes, the API-key check, metrics, and the two ways an answer leaves —
one JSON object, or server-sent events (one chunk per committed canvas, `data: [DONE]` last).

Every response is JSON with the OpenAI error object when something is wrong; nothing the client sends can
reach a traceback. A streamed request waits for the model's first response before the 200 goes out, so the
model's refusals (bad max_tokens, prompt too long, queue full) keep their 4xx/503 status. While a request
waits or streams, a watcher listens for the client's disconnect and cancels the gRPC stream at once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING


from .params import chat, completion, model_inputs
from .body import MAX_BODY_BYTES, check_content_type, parse_json, read_body
from .errors import ApiError, bad_request
from .metrics import Metrics
from .responses import Answer
from .triton import TritonBridge

if TYPE_CHECKING:  # annotations only: starlette is imported where the server runs
    from starlette.requests import Request
    from starlette.responses import JSONResponse

log = logging.getLogger("dgemma.openai")


@dataclass
class ServerConfig:
    model_name: str = "dgemma"
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    triton_metrics: str = ""  # Triton's metrics URL, named in /metrics (not proxied)


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was complete."""


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def watched(aw, receive):
    """Await `aw` unless the client disconnects first: then cancel it (closing its gRPC stream) and raise
    ClientGone. Neither task outlives this call."""
    task, watcher = asyncio.ensure_future(aw), asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def error_response(e: ApiError, request_id: str | None = None) -> JSONResponse:
    from starlette.responses import JSONResponse  # the serve extra: imported where the server runs
    headers = dict(e.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream:
    """Server-sent events from an async iterator of bytes (an ASGI response), cancelled when the client
    disconnects."""

    def __init__(self, chunks, request_id: str, metrics: Metrics):
        self.chunks, self.metrics, self.request_id = chunks, metrics, request_id

    async def __call__(self, scope, receive, send):
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no"), (b"x-request-id", self.request_id.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def pump():
            async for b in self.chunks:
                await send({"type": "http.response.body", "body": b, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        self.metrics.stream(+1)
        try:
            await watched(pump(), receive)
        except ClientGone:
            log.info("client left mid-stream (%s); gRPC stream cancelled", self.request_id)
        finally:
            self.metrics.stream(-1)
            await self.chunks.aclose()


def create_app(bridge: TritonBridge, tokenizer, cfg: ServerConfig | None = None) -> "Door":
    """The ASGI app (the Starlette routes behind the Door middleware) over a bridge whose ModelInfo is loaded
    (bridge.load_info()) and the checkpoint's tokenizer."""
    from starlette.applications import Starlette  # the serve extra: a CPU-only install still imports dgemma
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    cfg = cfg or ServerConfig()
    metrics = Metrics(f"the dgemma model's own metrics (dgemma_*): {cfg.triton_metrics}" if cfg.triton_metrics
                      else "")
    info = bridge.info
    # A prompt longer than max_prompt tokens times the longest token's bytes cannot fit: refused before Triton.
    longest = max(len(t.encode("utf-8")) for t in tokenizer.tok.get_vocab())
    max_prompt_bytes = int(info.param("max_prompt", "0") or 0) * longest or cfg.max_body_bytes

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    def guard(fn):
        @functools.wraps(fn)
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except ApiError as e:
                return error_response(e)
            except ClientGone:
                return Response(status_code=499)  # nginx's "client closed request": only the metrics see it
            except Exception:
                rid = uuid.uuid4().hex
                log.exception("unhandled error (ref %s) on %s %s", rid, request.method, request.url.path)
                return error_response(ApiError(500, f"internal error (ref {rid}); see the server log.",
                                               code="internal_error"))
        return endpoint

    def model_card() -> dict:
        # no filesystem paths here (the checkpoint's location is the operator's business, not the client's)
        return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "dgemma",
                "max_model_len": int(info.param("max_context", "0") or 0)}

    @guard
    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    @guard
    async def model(request: Request):
        if request.path_params["model_id"] != cfg.model_name:
            raise ApiError(404, f"The model `{request.path_params['model_id'][:200]}` does not exist.", "model",
                           "model_not_found")
        return JSONResponse(model_card())

    async def generate(request: Request, kind: str):
        check_content_type(request.headers.get("content-type"))
        body = parse_json(await read_body(request.receive, request.headers, cfg.max_body_bytes))
        gen = (chat(body, cfg.model_name, tokenizer.render_chat) if kind == "chat"
               else completion(body, cfg.model_name))
        size = len(gen.prompt.encode("utf-8"))
        if size > max_prompt_bytes:
            raise bad_request(f"the prompt is {size} bytes; the served model takes at most {info.param('max_prompt')} "
                              f"tokens, which no text over {max_prompt_bytes} bytes fits in.",
                              "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        inputs = model_inputs(gen, set(info.inputs))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        answer = Answer(gen, cfg.model_name, rid, token_text)
        events = bridge.generate(gen.prompt, inputs, rid)
        t0 = request.scope.get("dgemma.t0", time.perf_counter())
        try:
            if not gen.stream:
                async def collect():
                    return [ev async for ev in events]
                result = answer.whole(await watched(collect(), request.receive))
                return JSONResponse(result, headers={"X-Request-Id": rid})
            first = await watched(events.__anext__(), request.receive)
        except StopAsyncIteration:
            first = None
        except ApiError as e:
            await events.aclose()
            return error_response(e, rid)
        except BaseException:
            await events.aclose()
            raise
        metrics.first(request.url.path, time.perf_counter() - t0)
        return EventStream(_chunks(answer, first, events), rid, metrics)

    @guard
    async def completions(request: Request):
        return await generate(request, "completion")

    @guard
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @guard
    async def ready(request: Request):
        if await bridge.ready():
            return JSONResponse({"status": "ready", "model": cfg.model_name})
        # an unauthenticated probe: it names no internal address (the server log does)
        log.warning("not ready: Triton at %s or its %s model", bridge.url, bridge.model)
        raise ApiError(503, f"Triton or its {bridge.model} model is not ready.", code="not_ready",
                       headers={"Retry-After": "5"})

    async def live(request: Request):
        return JSONResponse({"status": "live"})

    async def metrics_text(request: Request):
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException):
        text = {404: f"no route {request.url.path[:200]}; this server has /v1/models, /v1/completions, "
                     "/v1/chat/completions, /health/ready, /health/live, /metrics",
                405: f"method {request.method} is not allowed on {request.url.path[:200]}"}
        return error_response(ApiError(exc.status_code, text.get(exc.status_code, str(exc.detail)),
                                       code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)),
                              None)

    async def shutdown():
        await bridge.close()

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{model_id:path}", model, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/health/ready", ready, methods=["GET"]), Route("/health/live", live, methods=["GET"]),
              Route("/metrics", metrics_text, methods=["GET"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await shutdown()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.metrics = metrics
    return Door(app, cfg, metrics)


async def _chunks(answer: Answer, first, events):
    """SSE bytes: a chunk per event worth one, the finish (and usage) chunks, [DONE]; an error after the 200
    went out travels as an SSE error object."""
    try:
        pending = [first] if first is not None else []
        while True:
            if pending:
                ev = pending.pop()
            else:
                try:
                    ev = await events.__anext__()
                except StopAsyncIteration:
                    break
            chunk = answer.chunk(ev)
            if chunk is not None:
                yield _sse(chunk)
        for chunk in answer.final_chunks():
            yield _sse(chunk)
    except ApiError as e:
        yield _sse(e.body())
    except Exception:  # a bug after the 200 went out: the client still gets an error object and [DONE]
        log.exception("stream %s failed", answer.request_id)
        yield _sse(ApiError(500, f"internal error while streaming (request {answer.request_id}); see the server "
                                 "log.", code="internal_error").body())
    finally:
        await events.aclose()
    yield b"data: [DONE]\n\n"


class Door:
    """ASGI middleware in front of the app: the API key on /v1 (hmac.compare_digest), and per-request metrics."""

    def __init__(self, app, cfg: ServerConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.key = hashlib.sha256(cfg.api_key.encode("utf-8")).digest() if cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        scope["dgemma.t0"] = t0

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"].startswith("/v1"):
                err = self._auth(scope)
                if err is not None:
                    return await error_response(err)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.finished(scope["path"], status[0] or 500, time.perf_counter() - t0)

    def _auth(self, scope) -> ApiError | None:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        head = {"WWW-Authenticate": "Bearer"}
        if not values:
            return ApiError(401, "You didn't provide an API key: send Authorization: Bearer KEY.", code="missing_api_key",
                            headers=head)
        scheme, _, token = values[0].partition(b" ")
        # compare_digest over equal-length digests: the comparison time says nothing about the key or its length
        if scheme.lower() != b"bearer" or not hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.key):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key", headers=head)
        return None
