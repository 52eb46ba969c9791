"""`dgemma repo --ensemble`: tensorrtllm_backend's layout (model `ensemble`: preprocess -> canvas_loop ->
postprocess) on a real tritonserver answers what the default `dgemma` model answers (same inputs, same outputs,
same responses, streamed or not), refuses bad requests with the same messages, and has the documented limit: a
client's cancellation does not reach the in-flight canvas_loop step in Triton 2.51 (its row runs to its end)."""

from __future__ import annotations

import queue
import time

import pytest

from dgemma.serving.client import ServerError, encode_inputs, request
from dgemma.serving.metrics import metric, parse_metrics

from .conftest import start_server

SORT = "sort: 3 1 4 1 5 9 2 6 5 3"
COMMON = ("text_output", "canvas_index", "canvases", "steps_per_canvas", "tokens_per_forward", "is_draft",
          "finish_reason", "output_token_ids", "output_logprobs", "output_top_logprob_ids", "output_top_logprobs",
          "num_input_tokens", "num_output_tokens")


@pytest.fixture(scope="module")
def ens(tmp_path_factory, onnx_fp32):
    pytest.importorskip("tritonclient.grpc", reason="install the serving extra: pip install -e '.[serve]'")
    from dgemma.serving.render import render

    root = render("cpu", "bf16", threads=1, ensemble=True, out=tmp_path_factory.mktemp("ensemble") / "cpu" / "bf16")
    names = sorted(p.name for p in (root / "models").iterdir())
    assert names == ["canvas_loop", "denoiser", "encoder", "ensemble", "postprocess", "preprocess"]  # no `dgemma`
    srv = start_server(root)
    yield srv
    srv.stop()


def same_keys(a: list[dict], b: list[dict]) -> tuple[list, list]:
    """The responses restricted to what both carry (the ensemble's canvas_loop step sends every output)."""
    keys = [k for k in COMMON if all(k in r for r in a)]
    return [{k: r[k] for k in keys} for r in a], [{k: r.get(k) for k in keys} for r in b]


@pytest.mark.parametrize("params", [
    dict(seed=0),
    dict(seed=3, max_tokens=96, ignore_eos=True, stream=True),
    dict(seed=1, stream=True, stream_drafts=True, max_denoising_steps=4),
    dict(seed=2, top_logprobs=2, return_num_input_tokens=True, return_num_output_tokens=True),
    dict(seed=4, stop_words=["5 5"], temperature=1.1, max_tokens=64),
    dict(seed=5, infill="1 _ _ _ 3 _", adaptive_stopping=False, max_denoising_steps=6),
])
def test_ensemble_answers_what_the_dgemma_model_answers(ens, triton, params):
    want = request(triton.grpc_url, SORT, **params)
    got = request(ens.grpc_url, SORT, model="ensemble", **params)
    a, b = same_keys(want, got)
    assert b == a and len(got) == len(want)


def test_ensemble_refuses_with_the_models_message(ens):
    with pytest.raises(ServerError, match=r"RequestError: max_tokens must be an integer >= 1 \(got 0\)"):
        request(ens.grpc_url, SORT, model="ensemble", max_tokens=0)
    with pytest.raises(ServerError, match=r"each stop word must be 1\.\.256 bytes"):
        request(ens.grpc_url, SORT, model="ensemble", stop_words=["x" * 300])
    assert request(ens.grpc_url, SORT, model="ensemble", seed=0)[-1]["text_output"] == "1 1 2 3 3 4 5 5 6 9"


def test_cancellation_does_not_reach_the_canvas_loop_step(ens):
    """The documented limit (config.pbtxt of `ensemble`, README): the stream is cancelled after its first canvas,
    yet the canvas_loop row runs all its canvases and ends as `ok`, not `cancelled`."""
    import tritonclient.grpc as grpcclient

    m0 = parse_metrics(ens.metrics())
    events: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(ens.grpc_url)
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    values = dict(text_input=SORT, seed=0, max_tokens=192, ignore_eos=True, stream=True, adaptive_stopping=False,
                  max_denoising_steps=8)
    c.async_stream_infer("ensemble", encode_inputs(grpcclient, values), enable_empty_final_response=True)
    result, error = events.get(timeout=60)
    assert error is None
    c.stop_stream(cancel_requests=True)
    c.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m1 = parse_metrics(ens.metrics())
        done = metric(m1, "dgemma_requests_total") - metric(m0, "dgemma_requests_total")
        if done >= 1:
            break
        time.sleep(0.2)
    assert metric(m1, "dgemma_requests_total", outcome="ok") - metric(m0, "dgemma_requests_total", outcome="ok") == 1
    assert metric(m1, "dgemma_canvases_per_request_sum") - metric(m0, "dgemma_canvases_per_request_sum") == 6
