"""The `dgemma` ensemble on a real tritonserver: same answers as in-process generation, streaming order,
concurrency, error messages, HTTP generate."""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from dgemma.client import ServerError, request

PROMPTS = [("sort: 3 1 4 1 5 9 2 6 5 3", 0), ("sort: 8 0 7 2 2 9 4 1 6 3", 7)]


@pytest.fixture(scope="module")
def local():
    """In-process generation with the same checkpoint: (backend, sampler defaults, tokenizer)."""
    from dgemma.cli import load_model, make_backend

    model, _cfg, sampler, tok = load_model(None, "cpu", None)
    return make_backend("torch", model, "bf16", 256), sampler, tok


def generate_local(local, prompt, seed, **over):
    from dgemma.sampler import generate

    backend, sampler, tok = local
    torch.set_num_threads(1)  # 2 threads next to a busy server thrash on a 2-core box (1 s -> 17-40 s)
    canvases = []
    ids = torch.tensor([tok.encode_chat(prompt)])
    res = generate(backend, ids, sampler.replace(**over), torch.Generator().manual_seed(seed),
                   on_canvas=lambda i, c: canvases.append(tok.decode(c[0].tolist())))
    return tok.decode(res.new_tokens[0].tolist()), res, canvases


@pytest.mark.parametrize("prompt, seed", PROMPTS)
def test_ensemble_equals_dgemma_generate(triton, prompt, seed, capsys):
    from dgemma.cli import main

    assert main(["generate", "--prompt", prompt, "--seed", str(seed), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    got = request(triton.grpc_url, prompt, seed=seed)
    assert len(got) == 1  # not streaming: exactly one response
    assert got[0]["text_output"] == want["text"]
    assert got[0]["canvases"] == want["canvases"] and got[0]["steps_per_canvas"] == want["steps_per_canvas"]
    assert got[0]["tokens_per_forward"] == pytest.approx(want["tokens_per_forward"], abs=1e-3)


def test_streaming_canvas_order_then_final_flag(triton, local):
    import tritonclient.grpc as grpcclient

    from dgemma.client import _decode, _inputs

    prompt, seed = PROMPTS[0]
    _text, res, want_canvases = generate_local(local, prompt, seed, max_new_tokens=96, ignore_eos=True)
    assert res.canvases == 3
    events: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    c.async_stream_infer("dgemma", _inputs(grpcclient, {"text_input": prompt, "seed": seed, "max_tokens": 96,
                                                        "ignore_eos": True, "stream": True}),
                         enable_empty_final_response=True)
    seen = []
    while True:
        r, e = events.get(timeout=60)
        assert e is None, e
        resp = r.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        seen.append((_decode(r) if resp.outputs else None, final))
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


def test_eight_concurrent_clients(triton, local):
    rng = np.random.default_rng(0)
    digits = [" ".join(map(str, rng.integers(0, 10, 10))) for _ in range(8)]  # the tiny model sorts 10 digits
    jobs = [(f"sort: {d}", i) for i, d in enumerate(digits)]
    want = {j: generate_local(local, *j)[0] for j in jobs}
    got, errors = {}, []

    def worker(job):
        try:
            got[job] = request(triton.grpc_url, job[0], seed=job[1])[-1]["text_output"]
        except Exception as e:  # collected and reported below
            errors.append(f"{job}: {e}")

    threads = [threading.Thread(target=worker, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == want
    assert sum(w == " ".join(sorted(j[0][6:].split())) for j, w in want.items()) >= 6  # the model does sort


@pytest.mark.parametrize("params, pattern", [
    (dict(text_input=""), r"text_input is empty \(got ''\)"),
    (dict(text_input="sort: " + " ".join("7" * 40)), r"prompt has \d+ tokens; cpu/bf16 holds at most 64 prompt "
                                                    r"tokens \(GpuProfile\.max_prompt\)"),
    (dict(max_tokens=0), r"max_tokens must be an integer >= 1 \(got 0\)"),
    (dict(max_tokens=4096), r"max_tokens=4096 .* cpu/bf16 holds at most 256 prompt\+output tokens "
                            r"\(GpuProfile\.max_context\)"),
    (dict(entropy_bound=-0.5), r"entropy_bound must be a finite number > 0 \(got -0\.5\)"),
    (dict(max_denoising_steps=100), r"max_denoising_steps must be an integer in 1\.\.48 \(got 100\)"),
    (dict(temperature="0.7"), r"temperature"),  # an input the ensemble does not declare
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


def test_infill_input_keeps_fixed_tokens(triton, capsys):
    """The ensemble's optional `infill` input == `dgemma generate --infill` (fixed tokens kept, holes denoised)."""
    from dgemma.cli import main

    prompt, template = "sort: 8 0 7 2 2 9 4 1 6 3", "0 1 _ _ _ _ _ _ _ _ _ _ _ _ _ _ 8 9"
    assert main(["generate", "--prompt", prompt, "--seed", "0", "--infill", template, "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    got = request(triton.grpc_url, prompt, seed=0, infill=template)
    assert got[0]["text_output"] == want["text"]
    assert got[0]["text_output"].startswith("0 1 ") and got[0]["text_output"].rstrip().endswith("8 9")


def test_start_is_idempotent_and_context_manager_keeps_one_server(triton):
    pid = triton.proc.pid
    assert triton.start() is triton and triton.proc.pid == pid
    with triton as same:  # __enter__ on a running server must not launch (and orphan) a second one
        assert same.proc.pid == pid
    assert triton.proc.poll() is not None  # __exit__ stopped it
    triton.start()  # restart for the remaining tests of the session
    assert triton.ready()
