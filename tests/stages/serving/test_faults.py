"""Internal faults are not user errors: a graph model that crashes answers INTERNAL with one line and no
traceback (the server log keeps it); the `dgemma` model whose graph model is gone answers UNAVAILABLE with one line;
a bad request stays INVALID_ARG; the server keeps serving afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from dgemma.core import contract
from dgemma.model.checkpoint import load_config
from dgemma.tiny import DEFAULT_CHECKPOINT

PROMPT = "sort: 3 1 4 1 5 9 2 6 5 3"
ANSWER = "1 1 2 3 3 4 5 5 6 9"


def _status(exc) -> str:
    return str(exc.status())


def _http_status(srv, body: dict) -> int:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{srv.http_url}/v2/models/dgemma/generate", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_graph_model_crash_is_internal_with_one_line(triton_bls):
    """Buffers whose capacities disagree pass Triton's per-tensor shape checks and fail inside ONNX Runtime."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    cfg = load_config(DEFAULT_CHECKPOINT)[0]
    inputs = []
    for t in contract.inputs(contract.DENOISER, cfg, "fp32"):
        shape = [1 if d == contract.BATCH else (40 if t.name.startswith("past_value") else 48)
                 if d == contract.KV_CAPACITY else d for d in t.dims]
        arr = np.zeros(contract.wire_shape(t, shape), dtype=np.int64 if t.dtype == "int64" else np.float32)
        x = grpcclient.InferInput(t.name, list(arr.shape), "INT64" if t.dtype == "int64" else "FP32")
        x.set_data_from_numpy(arr)
        inputs.append(x)
    c = grpcclient.InferenceServerClient(triton_bls.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as e:
            c.infer(contract.DENOISER, inputs)
    finally:
        c.close()
    msg = e.value.message()
    assert "INTERNAL" in _status(e.value) and msg.startswith("denoiser failed (")
    assert "Traceback" not in msg and "\n" not in msg
    assert "Traceback" in (triton_bls.root / "server.log").read_text()  # the details stay in the server log


def test_dgemma_without_its_graph_model_is_unavailable_then_recovers(triton_bls):
    import tritonclient.grpc as grpcclient

    from dgemma.serving.client import ServerError, request

    c = grpcclient.InferenceServerClient(triton_bls.grpc_url)
    try:
        c.unload_model(contract.DENOISER)
        with pytest.raises(ServerError) as e:
            request(triton_bls.grpc_url, PROMPT)
        msg = str(e.value)  # gRPC streams carry the message only; the code shows on HTTP below
        assert "graph model unavailable" in msg and "Traceback" not in msg and "\n" not in msg
        assert _http_status(triton_bls, {"text_input": PROMPT}) == 503  # UNAVAILABLE
        assert _http_status(triton_bls, {"text_input": ""}) == 400  # bad requests stay user errors (INVALID_ARG)
    finally:
        c.load_model(contract.DENOISER)
        c.close()
    assert request(triton_bls.grpc_url, PROMPT)[-1]["text_output"] == ANSWER  # still serving
