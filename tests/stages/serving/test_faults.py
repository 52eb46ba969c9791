"""Internal faults are not user errors: a graph model that crashes answers INTERNAL with one line and no
traceback (the server log keeps it); the `dgemma` model whose graph model is gone answers UNAVAILABLE with one line;
a bad request stays INVALID_ARG; the server keeps serving afterwards."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dgemma.core import contract
from dgemma.model.checkpoint import load_config
from dgemma.tiny import DEFAULT_CHECKPOINT

PROMPT = "sort: 3 1 4 1 5 9 2 6 5 3"
ANSWER = "1 1 2 3 3 4 5 5 6 9"


def _status(exc) -> str:
    return str(exc.status())




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
    log = triton_bls.root / "server.log"  # the details stay in the server log (written just after the answer)
    deadline = time.monotonic() + 10
    while "denoiser: Traceback" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "denoiser: Traceback" in log.read_text()


def test_dgemma_without_its_graph_model_is_unavailable_then_recovers(triton_bls):
    import tritonclient.grpc as grpcclient

    from dgemma.serving.client import ServerError, request

    c = grpcclient.InferenceServerClient(triton_bls.grpc_url)
    try:
        c.unload_model(contract.DENOISER)
        with pytest.raises(ServerError) as e:
            request(triton_bls.grpc_url, PROMPT)
        # gRPC streams (and Triton's HTTP generate, which answers 400 for any error of a decoupled model) carry
        # the message only: one line naming the fault, never the traceback nor a request-error class name
        msg = str(e.value)
        assert msg.startswith("graph model unavailable (request ") and "Traceback" not in msg and "\n" not in msg
        assert "RequestError" not in msg
        with pytest.raises(ServerError, match="RequestError: text_input is empty"):  # bad requests stay user errors
            request(triton_bls.grpc_url, "")
    finally:
        c.load_model(contract.DENOISER)
        c.close()
    assert request(triton_bls.grpc_url, PROMPT)[-1]["text_output"] == ANSWER  # still serving
