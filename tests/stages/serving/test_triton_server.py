"""The `dgemma` model on a real tritonserver: same answers as `dgemma generate --backend ort`, streaming order,
concurrency (with denoiser batches on the BLS rendering), cancellation, metrics, error messages, HTTP generate.
Tests taking `server` run against both renderings: the canvas loop in-process (ORT, the CPU default) and over BLS."""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from dgemma.serving.client import ServerError, encode_inputs, request, stats
from dgemma.serving.metrics import metric, parse_metrics

from .clients import concurrently

PROMPTS = [("sort: 3 1 4 1 5 9 2 6 5 3", 0), ("sort: 8 0 7 2 2 9 4 1 6 3", 7)]
MAX_CONTEXT = 256  # GpuProfile cpu: the KV capacity the server's backends use


@pytest.fixture(scope="module")
def local(onnx_fp32):
    """In-process generation over the same ONNX graphs and capacity: (backend, sampler defaults, tokenizer)."""
    from dgemma.model.checkpoint import load_checkpoint
    from dgemma.runtime.ort_backend import OrtBackend
    from dgemma.tiny import ensure_tiny
    from dgemma.model.tokens import Tokenizer

    ck = ensure_tiny()
    return OrtBackend(onnx_fp32, max_context=MAX_CONTEXT, threads=1), load_checkpoint(ck).sampler, Tokenizer(ck)


def generate_local(local, prompt, seed, **over):
    from dgemma.generation.sampler import generate

    backend, sampler, tok = local
    torch.set_num_threads(1)  # 2 threads next to a busy server thrash on a 2-core box (1 s -> 17-40 s)
    canvases = []
    ids = torch.tensor([tok.encode_chat(prompt)])
    res = generate(backend, ids, sampler.replace(**over), torch.Generator().manual_seed(seed),
                   on_canvas=lambda i, c: canvases.append(tok.decode(c[0].tolist())))
    return tok.decode(res.new_tokens[0].tolist()), res, canvases


_CLI: dict = {}


def cli_generate(capsys, *args):
    """`dgemma generate --backend ort --precision fp32 --max-context 256 ... --json`, once per argument list."""
    from dgemma.cli import main

    if args not in _CLI:
        assert main(["generate", "--backend", "ort", "--precision", "fp32", "--max-context", str(MAX_CONTEXT),
                     *args, "--json"]) == 0
        _CLI[args] = json.loads(capsys.readouterr().out)
    return _CLI[args]


def stream(url, **values):
    """Open a gRPC stream with one request; -> (client, queue of (result, error))."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    c.async_stream_infer("dgemma", encode_inputs(grpcclient, values), enable_empty_final_response=True)
    return c, events


def on_bls(srv) -> bool:
    return 'key: "backend" value: { string_value: "bls" }' in (srv.root / "models/dgemma/config.pbtxt").read_text()


def wait_metrics(srv, cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        m = parse_metrics(srv.metrics())
        if cond(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize("prompt, seed", PROMPTS)
def test_ensemble_equals_dgemma_generate_ort(server, prompt, seed, capsys):
    want = cli_generate(capsys, "--prompt", prompt, "--seed", str(seed))
    got = request(server.grpc_url, prompt, seed=seed)
    assert len(got) == 1  # not streaming: exactly one response
    assert got[0]["text_output"] == want["text"]
    assert got[0]["canvases"] == want["canvases"] and got[0]["steps_per_canvas"] == want["steps_per_canvas"]
    assert got[0]["tokens_per_forward"] == pytest.approx(want["tokens_per_forward"], abs=1e-3)


def test_streaming_canvas_order_then_final_flag(server, local):
    prompt, seed = PROMPTS[0]
    _text, res, want_canvases = generate_local(local, prompt, seed, max_new_tokens=96, ignore_eos=True)
    assert res.canvases == 3
    c, events = stream(server.grpc_url, text_input=prompt, seed=seed, max_tokens=96, ignore_eos=True, stream=True)
    from dgemma.serving.client import decode_result

    seen = []
    while True:
        r, e = events.get(timeout=60)
        assert e is None, e
        resp = r.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        seen.append((decode_result(r) if resp.outputs else None, final))
        if final:
            break
    c.stop_stream()
    c.close()
    # 3 canvases + 1 statistics response; the final flag ends the stream (alone, or on the last response: the
    # ensemble may merge them)
    assert [f for _, f in seen] == [False] * (len(seen) - 1) + [True]
    data = [d for d, _ in seen if d is not None]
    assert len(data) == 4
    assert [d["canvas_index"] for d in data] == [0, 1, 2, 3]
    assert [d["text_output"] for d in data[:3]] == want_canvases and data[3]["text_output"] == ""
    assert [len(d["steps_per_canvas"]) for d in data[:3]] == [1, 2, 3]
    assert data[3]["steps_per_canvas"] == res.steps_per_canvas and data[3]["canvases"] == 3
    assert data[3]["tokens_per_forward"] == pytest.approx(float(res.tokens_per_forward[0]), abs=1e-3)


def test_drafts_fixed_steps_and_temperature_range(triton, local):
    """stream_drafts: one draft per denoising step before each committed canvas; adaptive_stopping=false runs
    exactly max_denoising_steps; the temperature range reaches the sampler (the answer equals in-process with
    the same range)."""
    prompt, seed = PROMPTS[1]
    out = request(triton.grpc_url, prompt, seed=seed, max_tokens=64, ignore_eos=True, stream=True,
                  stream_drafts=True, adaptive_stopping=False, max_denoising_steps=5)
    kinds = [(d["is_draft"], d["canvas_index"]) for d in out]
    assert kinds == [(True, 0)] * 5 + [(False, 0)] + [(True, 1)] * 5 + [(False, 1), (False, 2)]
    assert [d["steps_per_canvas"][-1] for d in out[:5]] == [1, 2, 3, 4, 5] and out[-1]["steps_per_canvas"] == [5, 5]
    assert out[4]["text_output"] == out[5]["text_output"]  # the committed canvas is the last step's argmax
    text, res, _ = generate_local(local, prompt, seed, max_new_tokens=32, t_min=0.1, t_max=2.0)
    (r,) = request(triton.grpc_url, prompt, seed=seed, max_tokens=32, temperature_min=0.1, temperature_max=2.0)
    assert r["text_output"] == text and r["steps_per_canvas"] == res.steps_per_canvas


def test_eight_concurrent_clients(server, local):
    """8 clients at once, each answered exactly as its own B=1 in-process run; their rows share the scheduler's
    batched steps (dgemma_rows_per_step > 1); on the BLS rendering the denoiser model's executions account for
    every row's steps."""
    rng = np.random.default_rng(0)
    digits = [" ".join(map(str, rng.integers(0, 10, 10))) for _ in range(8)]  # the tiny model sorts 10 digits
    jobs = [(f"sort: {d}", i) for i, d in enumerate(digits)]
    want = {j: generate_local(local, *j, max_new_tokens=64, ignore_eos=True) for j in jobs}
    b0 = stats(server.grpc_url).get("denoiser", {}).get("batches", {})
    m0 = parse_metrics(server.metrics())
    got = concurrently(lambda job: request(server.grpc_url, job[0], seed=job[1], max_tokens=64, ignore_eos=True)[-1],
                       jobs)
    assert {j: g["text_output"] for j, g in got.items()} == {j: w[0] for j, w in want.items()}
    assert {j: g["steps_per_canvas"] for j, g in got.items()} == {j: w[1].steps_per_canvas for j, w in want.items()}
    assert sum(w[0].startswith(" ".join(sorted(j[0][6:].split()))) for j, w in want.items()) >= 6  # it sorts
    m1 = parse_metrics(server.metrics())
    steps = sum(sum(w[1].steps_per_canvas) for w in want.values())
    rows = metric(m1, "dgemma_rows_per_step_sum") - metric(m0, "dgemma_rows_per_step_sum")
    calls = metric(m1, "dgemma_rows_per_step_count") - metric(m0, "dgemma_rows_per_step_count")
    print(f"mean rows per denoising step: {rows / calls:.2f} over {calls:.0f} steps")
    assert rows == steps and calls < steps  # every row-step counted once; some steps shared by several rows
    b1 = stats(server.grpc_url).get("denoiser", {}).get("batches", {})
    batches = {k: b1.get(k, 0) - b0.get(k, 0) for k in b1 if b1.get(k, 0) - b0.get(k, 0)}
    if on_bls(server):
        print(f"denoiser executions by batch size: {batches}")
        assert sum(k * n for k, n in batches.items()) == steps
        assert max(batches) > 1
    else:
        assert not batches  # in-process: the denoiser model is not used


def test_cancel_mid_stream_stops_the_loop_and_frees_the_slot(server):
    """A streamed 6-canvas request cancelled after its first canvas: the loop stops before the 6th canvas
    (metrics: cancelled +1, fewer canvases committed), its slot is free at once and the next request is served."""
    prompt = PROMPTS[1][0]
    m0 = parse_metrics(server.metrics())
    c, events = stream(server.grpc_url, text_input=prompt, seed=0, max_tokens=192, ignore_eos=True, stream=True)
    r, e = events.get(timeout=60)
    assert e is None and r.get_response().outputs  # the first canvas
    c.stop_stream(cancel_requests=True)
    c.close()
    before = metric(m0, "dgemma_requests_total", outcome="cancelled")
    m1 = wait_metrics(server, lambda m: metric(m, "dgemma_requests_total", outcome="cancelled") > before)

    def d(name, **labels):
        return metric(m1, name, **labels) - metric(m0, name, **labels)

    assert d("dgemma_requests_total", outcome="cancelled") == 1 and d("dgemma_requests_total", outcome="ok") == 0
    assert d("dgemma_canvases_per_request_count") == 1
    assert 1 <= d("dgemma_canvases_per_request_sum") < 6  # stopped early
    assert metric(m1, "dgemma_requests_active") == 0 and metric(m1, "dgemma_requests_queued") == 0
    assert "request cancelled after" in server.log_tail(400)
    assert request(server.grpc_url, PROMPTS[0][0])[-1]["text_output"] == "1 1 2 3 3 4 5 5 6 9"


def test_metrics_endpoint_reports_steps_and_canvases(server):
    m0 = parse_metrics(server.metrics())
    out = request(server.grpc_url, PROMPTS[0][0], seed=0, max_tokens=64, ignore_eos=True)[-1]
    m1 = parse_metrics(server.metrics())

    def d(name, **labels):
        return metric(m1, name, **labels) - metric(m0, name, **labels)

    steps = out["steps_per_canvas"]
    assert out["canvases"] == 2 and len(steps) == 2
    assert d("dgemma_requests_total", outcome="ok") == 1
    assert d("dgemma_canvases_per_request_count") == 1 and d("dgemma_canvases_per_request_sum") == 2
    assert d("dgemma_steps_per_canvas_count") == 2 and d("dgemma_steps_per_canvas_sum") == sum(steps)
    for le in ("1", "2", "4", "8", "48"):
        assert d("dgemma_steps_per_canvas_bucket", le=le) == sum(s <= int(le) for s in steps)
    assert d("dgemma_graph_seconds_count", graph="denoiser") == sum(steps)
    assert d("dgemma_graph_seconds_count", graph="encoder") == 2  # prefill + one commit (the last is not encoded)
    assert d("nv_inference_count", model="dgemma") == 1
    bls = on_bls(server)
    assert d("nv_inference_count", model="denoiser") == (sum(steps) if bls else 0)
    assert d("nv_inference_count", model="encoder") == (2 if bls else 0)


@pytest.mark.parametrize("params, pattern", [
    (dict(text_input=""), r"text_input is empty \(got ''\)"),
    (dict(text_input="sort: " + " ".join("7" * 40)), r"prompt has \d+ tokens; cpu/bf16 holds at most 64 prompt "
                                                    r"tokens \(GpuProfile\.max_prompt\)"),
    (dict(max_tokens=0), r"max_tokens must be an integer >= 1 \(got 0\)"),
    (dict(max_tokens=4096), r"max_tokens=4096 .* cpu/bf16 holds at most 256 prompt\+output tokens "
                            r"\(GpuProfile\.max_context\)"),
    (dict(entropy_bound=-0.5), r"entropy_bound must be a finite number > 0 \(got -0\.5\)"),
    (dict(max_denoising_steps=100), r"max_denoising_steps must be an integer in 1\.\.48 \(got 100\)"),
    (dict(top_k=5), r"top_k"),  # an input the model does not declare
    (dict(temperature_min=0.9, temperature_max=0.5), r"temperature_min < temperature_max \(got 0\.9\d* and 0\.5"),
])
def test_bad_inputs_name_value_and_limit(triton, params, pattern):
    params = {"text_input": PROMPTS[0][0], **params}
    text = params.pop("text_input")
    with pytest.raises(ServerError, match=pattern):
        request(triton.grpc_url, text, **params)


def test_model_not_loaded_then_still_serving(triton):
    with pytest.raises(ServerError, match="no_such_model"):
        request(triton.grpc_url, PROMPTS[0][0], model="no_such_model")
    assert request(triton.grpc_url, PROMPTS[0][0])[-1]["text_output"] == "1 1 2 3 3 4 5 5 6 9"


def test_http_generate_returns_text_output(triton):
    body = json.dumps({"text_input": PROMPTS[0][0], "max_tokens": 32, "seed": 0}).encode()
    req = urllib.request.Request(f"http://{triton.http_url}/v2/models/dgemma/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert out["text_output"] == "1 1 2 3 3 4 5 5 6 9" and out["canvases"] == 1
    bad = urllib.request.Request(f"http://{triton.http_url}/v2/models/dgemma/generate",
                                 data=json.dumps({"text_input": "", "max_tokens": 32}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=60)
    assert "text_input is empty" in e.value.read().decode()


def test_client_cli_health_and_prompt(triton, capsys):
    from dgemma.cli import main

    assert main(["client", "--health", "--url", triton.grpc_url, "--json"]) == 0
    h = json.loads(capsys.readouterr().out)
    assert h["ready"] and all(h["models"].values())
    assert main(["client", "--url", triton.grpc_url, "--prompt", PROMPTS[0][0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text_output"] == "1 1 2 3 3 4 5 5 6 9"
    assert main(["client", "--url", triton.grpc_url, "--prompt", ""]) == 2
    assert "text_input is empty" in capsys.readouterr().err
    assert main(["client", "--url", triton.grpc_url, "--stats", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert set(st) == {"dgemma", "encoder", "denoiser"} and st["dgemma"]["requests"] >= 1


def test_infill_input_keeps_fixed_tokens(triton, capsys):
    """The ensemble's optional `infill` input == `dgemma generate --infill` (fixed tokens kept, holes denoised)."""
    prompt, template = "sort: 8 0 7 2 2 9 4 1 6 3", "0 1 _ _ _ _ _ _ _ _ _ _ _ _ _ _ 8 9"
    want = cli_generate(capsys, "--prompt", prompt, "--seed", "0", "--infill", template, "--max-new-tokens", "64")
    got = request(triton.grpc_url, prompt, seed=0, infill=template, max_tokens=64)
    assert got[0]["text_output"] == want["text"]
    # the template's 35 tokens span two canvases (the rest of the second is holes)
    assert got[0]["text_output"].startswith("0 1 ") and "8 9" in got[0]["text_output"][20:]


def test_start_is_idempotent_and_context_manager_keeps_one_server(triton):
    pid = triton.proc.pid
    assert triton.start() is triton and triton.proc.pid == pid
    with triton as same:  # __enter__ on a running server must not launch (and orphan) a second one
        assert same.proc.pid == pid
    assert triton.proc.poll() is not None  # __exit__ stopped it
    triton.start()  # restart for the remaining tests of the session
    assert triton.ready()


def collect(url, values, cancel_after: int | None = None, timeout_s: float = 120.0) -> list[dict]:
    """Every response of one streamed request, in arrival order; with cancel_after=k the client cancels the
    stream once it holds k responses (a user who closes the tab)."""
    from dgemma.serving.client import decode_result

    c, events = stream(url, **values)
    out = []
    try:
        while True:
            if cancel_after is not None and len(out) >= cancel_after:
                c.stop_stream(cancel_requests=True)
                return out
            r, e = events.get(timeout=timeout_s)
            assert e is None, f"{e} (request {values})"
            if r.get_response().outputs:
                out.append(decode_result(r))
            if r.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        c.close()


def mixed_requests() -> list[dict]:
    """16 streamed requests that differ in everything a row can: steps, temperatures, infill, adaptive on and off,
    prompt lengths (about 10 to 55 tokens), drafts, stop sequences, logprobs, seeds."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(16):
        n = [1, 3, 8, 12][i % 4]
        d = {"text_input": "sort: " + " ".join(map(str, rng.integers(0, 10, n))), "seed": int(rng.integers(0, 2**40)),
             "stream": True, "max_tokens": [32, 64, 96][i % 3], "ignore_eos": i % 5 == 0}
        if i % 4 == 1:
            d["max_denoising_steps"] = int(rng.integers(2, 12))
        if i % 3 == 2:
            d["adaptive_stopping"] = False
            d["max_denoising_steps"] = int(rng.integers(2, 6))
        if i % 4 == 3:
            d["temperature_min"], d["temperature_max"] = 0.2, float(rng.uniform(0.5, 1.8))
        elif i % 6 == 1:
            d["temperature"] = 1.2
        if i % 7 == 3:
            d["infill"] = "0 _ _ _ 9"
        if i % 5 == 2:
            d["stream_drafts"] = True
        if i % 8 == 5:
            d["stop_words"] = ["5"]
        if i % 4 == 2:
            d["top_logprobs"] = 2
        out.append(d)
    return out


def test_sixteen_streaming_clients_mixed_and_cancelled_get_their_solo_answers(server):
    """Issue 17's acceptance on a real server: 16 concurrent streaming clients with mixed parameters, three of which
    cancel mid-stream, get exactly the responses they get alone (same texts, drafts, steps, logprobs; none lost or
    duplicated; a cancelled client a prefix of its solo stream); rows shared steps; the cancelled rows were freed."""
    reqs = mixed_requests()
    solo = [collect(server.grpc_url, d) for d in reqs]
    longest = sorted(range(16), key=lambda i: -len(solo[i]))[:3]  # the most responses: still running when cancelled
    cancel = {i: 1 for i in longest}
    assert all(len(solo[i]) >= 3 for i in cancel), [len(s) for s in solo]
    m0 = parse_metrics(server.metrics())
    got = concurrently(lambda i: collect(server.grpc_url, reqs[i], cancel_after=cancel.get(i)), range(16), 180)
    for i in range(16):
        want = solo[i][: cancel[i]] if i in cancel else solo[i]
        assert got[i] == want, f"client {i} ({reqs[i]})"
    before = metric(m0, "dgemma_requests_total", outcome="cancelled")
    ok0 = metric(m0, "dgemma_requests_total", outcome="ok")
    m1 = wait_metrics(server, lambda m: metric(m, "dgemma_requests_total", outcome="cancelled") - before
                      + metric(m, "dgemma_requests_total", outcome="ok") - ok0 >= 16
                      and metric(m, "dgemma_requests_active") == 0)

    def d(name, **labels):
        return metric(m1, name, **labels) - metric(m0, name, **labels)

    # a cancellation lands at the row's next step; one whose row finished first counts as ok
    cancelled = d("dgemma_requests_total", outcome="cancelled")
    assert cancelled >= 1 and cancelled + d("dgemma_requests_total", outcome="ok") == 16
    shared = d("dgemma_rows_per_step_count") - d("dgemma_rows_per_step_bucket", le="1")
    print(f"steps shared by 2+ rows: {shared:.0f} of {d('dgemma_rows_per_step_count'):.0f}; mean rows per step "
          f"{d('dgemma_rows_per_step_sum') / d('dgemma_rows_per_step_count'):.2f}")
    assert shared > 0
    assert metric(m1, "dgemma_requests_active") == 0 and metric(m1, "dgemma_requests_queued") == 0
