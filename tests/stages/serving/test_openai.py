"""`dgemma openai` on the session's real tritonserver: the OpenAI Python client against completions and chat
(equal to direct gRPC with the same rendered prompt and seed), streaming (one chunk per committed canvas, drafts
as an extension, [DONE]), seeds, errors as the client's exceptions, hostile requests (each a 4xx with the
OpenAI error object), client disconnects (the model's slot freed, no task left), 16 concurrent streams, the
queue-full 503, the API key, metrics, the loopback-only Triton HTTP door and `dgemma serve`'s ports.

Answers to chat requests, and the features that need the model-side contract (stop, logprobs, usage,
temperature), are in test_openai_model_features.py: the server renders chats itself and sends <bos>-prefixed
prompts, which only a model with that contract takes as they are."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="install the serving extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="install the serving extra: pip install -e '.[serve]'")

from dgemma.serving.client import request  # noqa: E402
from dgemma.serving.metrics import metric, parse_metrics  # noqa: E402

from .clients import concurrently  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SORT = "sort: 3 1 4 1 5 9 2 6 5 3"


@pytest.fixture(scope="module")
def oa(triton):
    from dgemma.serving.openai_api import start_in_thread

    run = start_in_thread(triton.grpc_url)
    yield run
    run.stop()
    assert not run.thread.is_alive()


@pytest.fixture(scope="module")
def client(oa):
    return openai.OpenAI(base_url=oa.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def raw(oa):
    with httpx.Client(base_url=oa.base_url.removesuffix("/v1"), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tok():
    from dgemma.tiny import DEFAULT_CHECKPOINT
    from dgemma.model.tokens import Tokenizer

    return Tokenizer(DEFAULT_CHECKPOINT)


def direct(triton, text, **params) -> str:
    """The same request straight to Triton over gRPC (dgemma.client), -> its text."""
    return "".join(r["text_output"] for r in request(triton.grpc_url, text, **params) if not r["is_draft"])


def chat(messages):
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


# -- answers -----------------------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["dgemma"]
    assert client.models.retrieve("dgemma").id == "dgemma"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion_equals_direct_grpc(client, triton):
    r = client.completions.create(model="dgemma", prompt=SORT, seed=3, max_tokens=64)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == direct(triton, "<bos>" + SORT, seed=3, max_tokens=64)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.dgemma["seed"] == 3 and r.dgemma["canvases"] == len(r.dgemma["steps_per_canvas"]) >= 1


def test_streaming_sends_one_chunk_per_committed_canvas(client, raw):
    kw = dict(model="dgemma", prompt=SORT, seed=1, max_tokens=96, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    content = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert [c.dgemma["canvas_index"] for c in content] == [0, 1, 2]  # tiny canvas: 32 tokens, 96 = 3 canvases
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].dgemma["canvases"] == 3
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "text_completion"
    with raw.stream("POST", "/v1/completions", json={"model": "dgemma", "prompt": SORT, "stream": True,
                                                      "max_tokens": 64, "ignore_eos": True, "seed": 1}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    body = [json.loads(e[6:]) for e in events[:-1]]
    assert [b["dgemma"].get("canvas_index") for b in body[:2]] == [0, 1] and body[-1]["choices"][0]["finish_reason"]


def test_stream_drafts_ride_in_the_extension_field(client):
    chunks = list(client.completions.create(
        model="dgemma", prompt=SORT, seed=2, max_tokens=64, stream=True,
        extra_body={"stream_drafts": True, "adaptive_stopping": False, "max_denoising_steps": 3, "ignore_eos": True}))
    drafts = [c.dgemma["draft"] for c in chunks if "draft" in (c.dgemma or {})]
    assert [(d["canvas_index"], d["step"]) for d in drafts] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(c.choices[0].text == "" for c in chunks if "draft" in (c.dgemma or {}))
    committed = [c for c in chunks if c.choices and c.choices[0].text]
    assert committed[0].choices[0].text == drafts[2]["text"]  # the committed canvas is the last step's draft


def test_seeds_reproduce_and_differ(client):
    def text(seed=None):
        r = client.completions.create(model="dgemma", prompt="tell me a story", max_tokens=32, seed=seed,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.dgemma["seed"]

    a, b = text(11), text(11)
    assert a == b
    assert len({text(s)[0] for s in (11, 12, 13)}) > 1
    drawn, seed = text()  # no seed: a fresh one, reported so the answer can be replayed
    assert text(seed)[0] == drawn


# -- errors ----------------------------------------------------------------------------------------------------------
def test_errors_raise_the_clients_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.chat.completions.create(model="dgemma", messages=chat(SORT), n=2)
    with pytest.raises(openai.BadRequestError, match=r"GpuProfile\.max_context") as e:  # the model's own message
        client.completions.create(model="dgemma", prompt=SORT, max_tokens=100_000)
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="llama", messages=chat(SORT))
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="dgemma", prompt="   ")


OK = {"model": "dgemma", "messages": [{"role": "user", "content": SORT}]}
MALFORMED = [  # (name, path, body bytes or JSON object, headers)
    ("empty body", "/v1/chat/completions", b"", None),
    ("not JSON", "/v1/chat/completions", b"model=dgemma", None),
    ("truncated JSON", "/v1/chat/completions", b'{"model": "dgemma", "messages": [', None),
    ("JSON array", "/v1/chat/completions", b"[1, 2]", None),
    ("JSON string", "/v1/completions", b'"hello"', None),
    ("invalid UTF-8", "/v1/chat/completions", b'{"model": "dgemma", "messages": "\xff\xfe"}', None),
    ("lone surrogate", "/v1/completions", b'{"model": "dgemma", "prompt": "\\ud800"}', None),
    ("NaN", "/v1/chat/completions", b'{"model": "dgemma", "messages": [], "temperature": NaN}', None),
    ("Infinity", "/v1/completions", b'{"model": "dgemma", "prompt": "x", "temperature": Infinity}', None),
    ("1e999", "/v1/completions", b'{"model": "dgemma", "prompt": "x", "entropy_bound": 1e999}', None),
    ("huge integer", "/v1/completions", b'{"model": "dgemma", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
    ("deep nesting", "/v1/chat/completions", b'{"messages": ' + b"[" * 64 + b"]" * 64 + b"}", None),
    ("text/plain", "/v1/chat/completions", json.dumps(OK).encode(), {"Content-Type": "text/plain"}),
    ("no content type", "/v1/chat/completions", json.dumps(OK).encode(), {"Content-Type": ""}),
    ("latin-1 charset", "/v1/chat/completions", json.dumps(OK).encode(),
     {"Content-Type": "application/json; charset=latin-1"}),
    ("missing model", "/v1/chat/completions", {"messages": OK["messages"]}, None),
    ("model not a string", "/v1/chat/completions", {**OK, "model": 7}, None),
    ("unknown model", "/v1/chat/completions", {**OK, "model": "gpt-4o"}, None),
    ("missing messages", "/v1/chat/completions", {"model": "dgemma"}, None),
    ("empty messages", "/v1/chat/completions", {**OK, "messages": []}, None),
    ("messages not a list", "/v1/chat/completions", {**OK, "messages": "hi"}, None),
    ("message not an object", "/v1/chat/completions", {**OK, "messages": ["hi"]}, None),
    ("tool role", "/v1/chat/completions", {**OK, "messages": [{"role": "tool", "content": "x"}]}, None),
    ("content a number", "/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": 5}]}, None),
    ("image part", "/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, None),
    ("missing prompt", "/v1/completions", {"model": "dgemma"}, None),
    ("token-id prompt", "/v1/completions", {"model": "dgemma", "prompt": [1, 2, 3]}, None),
    ("batched prompts", "/v1/completions", {"model": "dgemma", "prompt": ["a", "b"]}, None),
    ("max_tokens string", "/v1/chat/completions", {**OK, "max_tokens": "10"}, None),
    ("max_tokens float", "/v1/chat/completions", {**OK, "max_tokens": 10.5}, None),
    ("max_tokens zero", "/v1/chat/completions", {**OK, "max_tokens": 0}, None),
    ("max_tokens beyond int32", "/v1/chat/completions", {**OK, "max_tokens": 2**31}, None),
    ("tokens disagree", "/v1/chat/completions", {**OK, "max_tokens": 5, "max_completion_tokens": 6}, None),
    ("negative seed", "/v1/chat/completions", {**OK, "seed": -1}, None),
    ("seed a boolean", "/v1/chat/completions", {**OK, "seed": True}, None),
    ("temperature too high", "/v1/chat/completions", {**OK, "temperature": 2.5}, None),
    ("temperature a string", "/v1/chat/completions", {**OK, "temperature": "hot"}, None),
    ("stream a string", "/v1/chat/completions", {**OK, "stream": "yes"}, None),
    ("stream_options without stream", "/v1/chat/completions", {**OK, "stream_options": {"include_usage": True}},
     None),
    ("stream_drafts without stream", "/v1/completions", {"model": "dgemma", "prompt": "x", "stream_drafts": True},
     None),
    ("five stops", "/v1/chat/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, None),
    ("empty stop", "/v1/chat/completions", {**OK, "stop": [""]}, None),
    ("stop a number", "/v1/chat/completions", {**OK, "stop": 3}, None),
    ("logprobs 6", "/v1/completions", {"model": "dgemma", "prompt": "x", "logprobs": 6}, None),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**OK, "top_logprobs": 2}, None),
    ("chat logprobs an int", "/v1/chat/completions", {**OK, "logprobs": 3}, None),
    ("n=2", "/v1/chat/completions", {**OK, "n": 2}, None),
    ("n=true", "/v1/chat/completions", {**OK, "n": True}, None),
    ("best_of=2", "/v1/completions", {"model": "dgemma", "prompt": "x", "best_of": 2}, None),
    ("echo", "/v1/completions", {"model": "dgemma", "prompt": "x", "echo": True}, None),
    ("suffix", "/v1/completions", {"model": "dgemma", "prompt": "x", "suffix": "end"}, None),
    ("logit_bias", "/v1/chat/completions", {**OK, "logit_bias": {"50": 10}}, None),
    ("tools", "/v1/chat/completions", {**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, None),
    ("tool_choice", "/v1/chat/completions", {**OK, "tool_choice": "required"}, None),
    ("functions", "/v1/chat/completions", {**OK, "functions": [{"name": "f"}]}, None),
    ("json response_format", "/v1/chat/completions", {**OK, "response_format": {"type": "json_object"}}, None),
    ("top_p", "/v1/chat/completions", {**OK, "top_p": 0.5}, None),
    ("presence_penalty", "/v1/chat/completions", {**OK, "presence_penalty": 1.0}, None),
    ("entropy_bound zero", "/v1/chat/completions", {**OK, "entropy_bound": 0}, None),
    ("max_denoising_steps 100", "/v1/chat/completions", {**OK, "max_denoising_steps": 100}, None),  # the model's 400
    ("infill without holes", "/v1/chat/completions", {**OK, "infill": "1 2 3"}, None),  # the model's 400
    ("prompt over the byte cap", "/v1/completions", {"model": "dgemma", "prompt": "7 " * 4000}, None),
    ("prompt over max_prompt tokens", "/v1/completions", {"model": "dgemma", "prompt": "7 " * 100}, None),  # model
    ("GET on a POST route", "/v1/chat/completions", None, None),
    ("unknown route", "/v1/embeddings", {"model": "dgemma", "input": "x"}, None),
]


@pytest.mark.parametrize("name, path, body, headers", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_is_a_4xx_with_the_error_object(raw, name, path, body, headers):
    if body is None:
        r = raw.get(path)
    else:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        h = {"Content-Type": "application/json", **(headers or {})}
        h = {k: v for k, v in h.items() if v}
        r = raw.post(path, content=data, headers=h)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert "\n" not in err["message"]


def test_oversize_body_is_413_before_reading_it(raw):
    big = b'{"model": "dgemma", "prompt": "' + b"x" * (1 << 20) + b'"}'
    r = raw.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the cap counts while streaming
        for _ in range(40):
            yield b"x" * 65536

    r = raw.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_triton_crash_body_is_refused_and_everything_keeps_serving(raw, client, triton):
    """The body that SIGSEGVs tritonserver 2.51's HTTP frontend (README, Security): our door answers 400 before
    parsing it, and both servers go on serving."""
    body = b'{"text_input": ' + b"[" * 100000 + b'"x"' + b"]" * 100000 + b"}"
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = raw.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "nesting_too_deep"
    assert triton.proc.poll() is None and triton.ready()
    assert client.completions.create(model="dgemma", prompt=SORT, seed=0, max_tokens=32).choices[0].text is not None


# -- Triton: the queue, disconnects, concurrency ------------------------------------------------------------------------
def grpc_stream(url, **values):
    import tritonclient.grpc as grpcclient

    from dgemma.serving.client import encode_inputs as _inputs

    events: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    c.async_stream_infer("dgemma", _inputs(grpcclient, values), enable_empty_final_response=True)
    return c


def wait_metrics(triton, cond, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        m = parse_metrics(triton.metrics())
        if cond(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


LONG = dict(max_tokens=192, ignore_eos=True, adaptive_stopping=False, max_denoising_steps=48, stream=True)


def test_queue_full_is_503_with_retry_after(raw, triton):
    """Both slots busy and 16 queued (GpuProfile cpu: max_batch 2, 8x queued): the model answers UNAVAILABLE,
    the door 503 with Retry-After."""
    streams = [grpc_stream(triton.grpc_url, text_input=SORT, seed=i, **LONG) for i in range(18)]
    try:
        m = wait_metrics(triton, lambda m: metric(m, "dgemma_requests_queued") == 16)
        assert metric(m, "dgemma_requests_queued") == 16
        r = raw.post("/v1/completions", json={"model": "dgemma", "prompt": SORT, "max_tokens": 32})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "model_busy" and "dgemma is full" in r.json()["error"]["message"]
    finally:
        for c in streams:
            c.stop_stream(cancel_requests=True)
            c.close()
    m = wait_metrics(triton, lambda m: metric(m, "dgemma_requests_active") + metric(m, "dgemma_requests_queued") == 0)
    assert metric(m, "dgemma_requests_active") == 0 and metric(m, "dgemma_requests_queued") == 0


def tasks_in(loop) -> int:
    async def count():
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), loop).result(5)


def door_settles(oa, tasks_before: int) -> None:
    """No task or stream of the door outlives its request."""
    deadline = time.monotonic() + 5
    while tasks_in(oa.loop) > tasks_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tasks_in(oa.loop) <= tasks_before
    assert "dgemma_openai_streams_active 0" in httpx.get(oa.base_url.removesuffix("/v1") + "/metrics").text


def test_client_disconnect_mid_stream_frees_the_models_slot(oa, triton):
    """Closing the connection after the first streamed chunk (a draft after one denoising step of six canvases)
    cancels the gRPC stream: the model counts a cancelled request with fewer than 6 canvases and its slot is
    free at once (dgemma_requests_active back to 0). The tiny model needs only ~0.2-0.6 s for all six canvases,
    so on a loaded box it can finish before the client has read its first chunk; such a round (counted ok, not
    cancelled) proves nothing and is repeated, at most three times."""
    tasks = tasks_in(oa.loop)
    body = {"model": "dgemma", "prompt": SORT, "seed": 0, **LONG, "stream_drafts": True}
    for _ in range(3):
        m0 = parse_metrics(triton.metrics())
        with httpx.Client(base_url=oa.base_url, timeout=60) as c, c.stream("POST", "/completions", json=body) as r:
            assert r.status_code == 200
            assert "draft" in json.loads(next(line for line in r.iter_lines() if line)[6:])["dgemma"]

        def ended(m, outcome):
            return metric(m, "dgemma_requests_total", outcome=outcome) - metric(m0, "dgemma_requests_total",
                                                                                outcome=outcome)

        m1 = wait_metrics(triton, lambda m: ended(m, "cancelled") + ended(m, "ok") >= 1
                          and metric(m, "dgemma_requests_active") == 0)
        if ended(m1, "cancelled"):
            break
    assert ended(m1, "cancelled") == 1 and ended(m1, "ok") == 0
    assert metric(m1, "dgemma_requests_active") == 0
    assert metric(m1, "dgemma_canvases_per_request_sum") - metric(m0, "dgemma_canvases_per_request_sum") < 6
    door_settles(oa, tasks)


def test_client_giving_up_on_a_queued_request_cancels_it(oa, triton):
    """A non-streamed request queued behind six long ones: once the model holds it in its queue the client
    closes the connection, the door cancels the gRPC stream and the model drops the request from its queue
    (cancelled while queued)."""
    tasks = tasks_in(oa.loop)
    blockers = [grpc_stream(triton.grpc_url, text_input=SORT, seed=i, **LONG) for i in range(6)]
    try:
        wait_metrics(triton, lambda m: metric(m, "dgemma_requests_queued") == 4)
        m0 = parse_metrics(triton.metrics())
        body = json.dumps({"model": "dgemma", "prompt": SORT, "seed": 0, "max_tokens": 32}).encode()
        host, port = oa.base_url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port))) as s:  # a client that sends and then walks away
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            m = wait_metrics(triton, lambda m: metric(m, "dgemma_requests_queued") == 5)
            assert metric(m, "dgemma_requests_queued") == 5
        cancelled = metric(m0, "dgemma_requests_total", outcome="cancelled")
        m1 = wait_metrics(triton, lambda m: metric(m, "dgemma_requests_total", outcome="cancelled") > cancelled)
        assert metric(m1, "dgemma_requests_total", outcome="cancelled") == cancelled + 1
    finally:
        for b in blockers:
            b.stop_stream(cancel_requests=True)
            b.close()
    m2 = wait_metrics(triton, lambda m: metric(m, "dgemma_requests_active") + metric(m, "dgemma_requests_queued") == 0)
    assert metric(m2, "dgemma_requests_active") == 0 and metric(m2, "dgemma_requests_queued") == 0
    door_settles(oa, tasks)


def test_sixteen_concurrent_streams_get_their_solo_answers(client):
    import numpy as np

    rng = np.random.default_rng(1)
    jobs = [(f"sort: {' '.join(map(str, rng.integers(0, 10, 10)))}", i) for i in range(16)]

    def ask(job):
        chunks = client.completions.create(model="dgemma", prompt=job[0], seed=job[1], max_tokens=64, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    alone = {j: ask(j) for j in jobs}
    assert concurrently(ask, jobs) == alone


# -- the door itself: key, metrics, health, CLI ---------------------------------------------------------------------------
def test_api_key_guards_v1(triton):
    from dgemma.serving.openai_api import start_in_thread

    run = start_in_thread(triton.grpc_url, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=run.base_url, api_key="wrong", max_retries=0).models.list()
        r = httpx.get(run.base_url + "/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        ok = openai.OpenAI(base_url=run.base_url, api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "dgemma"
        assert httpx.get(run.base_url.removesuffix("/v1") + "/health/ready").status_code == 200  # probes need no key
    finally:
        run.stop()


def test_metrics_and_health(raw, client):
    client.completions.create(model="dgemma", prompt=SORT, seed=0, max_tokens=32)
    list(client.completions.create(model="dgemma", prompt=SORT, seed=0, max_tokens=32, stream=True))
    raw.post("/v1/completions", json={"model": "dgemma"})
    m = parse_metrics(raw.get("/metrics").text)
    assert metric(m, "dgemma_openai_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(m, "dgemma_openai_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert metric(m, "dgemma_openai_request_seconds_count", endpoint="/v1/completions") >= 2
    assert metric(m, "dgemma_openai_first_chunk_seconds_count", endpoint="/v1/completions") >= 1
    assert metric(m, "dgemma_openai_streams_active") == 0
    r = raw.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert raw.get("/health/live").json() == {"status": "live"}


def test_bridge_to_no_triton_is_not_ready():
    from dgemma.serving.openai_api.triton import TritonBridge

    async def check():
        b = TritonBridge("127.0.0.1:1")
        try:
            return await b.ready(timeout_s=0.5)
        finally:
            await b.close()

    assert asyncio.run(check()) is False


def test_cli_prints_the_base_url_and_takes_the_key_from_the_environment(triton):
    env = {**os.environ, "DGEMMA_API_KEY": "k3y", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen([sys.executable, "-m", "dgemma", "openai", "--url", triton.grpc_url, "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if "OpenAI API ready:" in line:
                break
        url = next(w for w in lines[-1].split() if w.startswith("http://127.0.0.1:"))
        assert url.endswith("/v1") and any("tiny-sort" in line for line in lines)  # tokenizer: the model's checkpoint
        assert httpx.get(url + "/models").status_code == 401
        assert httpx.get(url + "/models", headers={"Authorization": "Bearer k3y"}).json()["data"][0]["id"] == "dgemma"
    finally:
        p.terminate()
        p.wait(10)


def test_error_mapping_of_model_answers():
    from dgemma.serving.openai_api.errors import from_triton

    e = from_triton("Busy: dgemma is full: 2 requests generating", "r1")
    assert (e.status, e.headers, e.code) == (503, {"Retry-After": "1"}, "model_busy")
    e = from_triton("RequestError: max_tokens must be an integer >= 1 (got 0).", "r1")
    assert (e.status, e.param, e.message) == (400, "max_tokens", "max_tokens must be an integer >= 1 (got 0).")
    e = from_triton("in ensemble 'ensemble', RequestError: text_input is empty (got '').", "r1")  # --ensemble
    assert (e.status, e.param, e.message) == (400, "prompt", "text_input is empty (got '').")
    assert from_triton("Request for unknown model: 'dgemma' is not found", "r1").status == 503
    e = from_triton("internal error in dgemma (request 'r1'); see server log\nTraceback ...", "r1")
    assert e.status == 500 and "\n" not in e.message and "Traceback" not in e.message


def test_genai_perf_profiles_the_chat_endpoint(oa, tmp_path):
    from tests.stages.serving.test_perf_tools import genai_perf

    stats = genai_perf(tmp_path, "--endpoint-type", "chat", "-u", oa.base_url.removesuffix("/v1"))
    assert stats["request_throughput"]["avg"] > 0 and stats["request_count"]["avg"] == 4


# -- Triton's HTTP stays on loopback; dgemma serve's ports ---------------------------------------------------------------
def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = f[1].split(":")
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))  # host-order words
            ip = ipaddress.ip_address(raw)
            out.add((str(ip.ipv4_mapped or ip) if v6 else str(ip), int(port, 16)))
    return out


def test_triton_listens_on_loopback_only(triton):
    socks = listening(triton.proc.pid)
    ports = {triton.http_port, triton.grpc_port, triton.metrics_port}
    assert ports <= {p for _, p in socks}
    assert {a for a, p in socks if p in ports} == {"127.0.0.1"}


def test_serve_defaults_loopback_and_tritons_usual_ports(tmp_path):
    from dgemma.cli import build_parser
    from dgemma.serving.server import Server, pick_ports

    args = build_parser().parse_args(["serve"])
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert args.http_address == args.grpc_address == args.metrics_address == "127.0.0.1"
    cmd = Server(tmp_path, http_address=args.http_address).command(tmp_path / "models", tmp_path / "backends")
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(cmd)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports, notes = pick_ports({"http": taken, "grpc": 0})
    assert ports["http"] != taken and ports["grpc"] > 0 and notes == [f"http port {taken} is busy; using {ports['http']}"]


def test_client_default_url_falls_back_to_the_ready_file(tmp_path):
    from dgemma.serving.client import DEFAULT_URL, default_grpc_url

    ready = tmp_path / "serve.json"
    ready.write_text(json.dumps({"pid": os.getpid(), "grpc": "127.0.0.1:12345"}))
    with socket.socket() as s:
        eighty_one_busy = s.connect_ex(("127.0.0.1", 8001)) == 0
    assert default_grpc_url(ready) == (DEFAULT_URL if eighty_one_busy else "127.0.0.1:12345")
    ready.write_text(json.dumps({"pid": 2**22 + 12345, "grpc": "127.0.0.1:12345"}))  # no such process
    assert default_grpc_url(ready) == DEFAULT_URL
