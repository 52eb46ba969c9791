"""A gRPC client of the Triton `dgemma` model (tritonclient), used by `dgemma client`, the benchmarks and the tests.

The model is decoupled: plain infer is refused and every call goes through the streaming API (start_stream /
async_stream_infer), toolchain.md §3.3b. `request()` returns every response in order (one per committed canvas when
stream=True, exactly one otherwise); `encode_inputs` / `decode_result` convert between Python values and the
model's tensors (names and dtypes from dgemma.core.contract)."""

from __future__ import annotations

import json
import os
import queue
import socket
from pathlib import Path

import numpy as np

from ..core.contract import DENOISER, ENCODER, MODEL, MODEL_INPUTS, WIRE_DTYPES
from ..core.errors import DgemmaError
from ..core.layout import current


class ServerError(DgemmaError):
    """The server answered a request with an error (its message names the value and the limit)."""


DEFAULT_URL = "127.0.0.1:8001"  # Triton's usual gRPC port, where `dgemma serve` listens unless it was busy


def default_grpc_url(ready_file=None) -> str:
    """The gRPC address to use without --url: 127.0.0.1:8001 when something listens there, else the address a
    running `dgemma serve` wrote to its ready file (build/serve.json in the work directory), else 127.0.0.1:8001
    (and the request's error then says to start a server)."""
    try:
        socket.create_connection(("127.0.0.1", 8001), timeout=0.5).close()
        return DEFAULT_URL
    except OSError:
        pass
    try:
        ready = json.loads(Path(ready_file or current().serve_ready_file).read_text())
        os.kill(int(ready["pid"]), 0)  # the server that wrote it still runs
        return str(ready["grpc"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_URL


def encode_inputs(grpcclient, values: dict):
    """{input name: Python value} -> tritonclient InferInputs with the contract's dtypes and the model's batch dim
    ([1, 1] for a value, [1, n] for a list such as stop_words); None: left out; unknown names are sent as strings or
    INT32 so the server names them in its refusal."""
    out = []
    for name, v in values.items():
        if v is None:
            continue
        if name in MODEL_INPUTS:
            dtype = MODEL_INPUTS[name][0]
        else:
            dtype = "TYPE_STRING" if isinstance(v, (str, bytes)) else "TYPE_INT32"
        tname, np_dtype = WIRE_DTYPES[dtype]
        values_ = v if isinstance(v, (list, tuple)) else [v]
        arr = np.array([[x.encode("utf-8") if isinstance(x, str) else x for x in values_]], dtype=np_dtype)
        t = grpcclient.InferInput(name, list(arr.shape), tname)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def request(url: str, prompt: str, model: str = MODEL, timeout_s: float = 120.0, **params) -> list[dict]:
    """One request through gRPC streaming; -> [{text_output, canvas_index, canvases, steps_per_canvas,
    tokens_per_forward}] in arrival order. Raises ServerError with the server's message."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, encode_inputs(grpcclient, {"text_input": prompt, **params}),
                                  enable_empty_final_response=True)
        out = []
        while True:
            try:
                result, error = results.get(timeout=timeout_s)
            except queue.Empty:
                raise ServerError(f"no response from {url} within {timeout_s:.0f} s") from None
            if error is not None:
                raise ServerError(str(error))
            resp = result.get_response()
            if resp.outputs:
                out.append(decode_result(result))
            if resp.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def decode_result(result) -> dict:
    """One response's tensors -> {text_output, canvas_index, canvases, steps_per_canvas, tokens_per_forward,
    is_draft} plus, when the response carries them, finish_reason, num_input_tokens / num_output_tokens and
    output_token_ids / output_logprobs / output_top_logprob_ids / output_top_logprobs (lists)."""
    names = {o.name for o in result.get_response().outputs}
    d = {"text_output": result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")}
    for name in ("canvas_index", "canvases"):
        d[name] = int(result.as_numpy(name).reshape(-1)[0])
    d["steps_per_canvas"] = result.as_numpy("steps_per_canvas").reshape(-1).tolist()
    d["tokens_per_forward"] = round(float(result.as_numpy("tokens_per_forward").reshape(-1)[0]), 4)
    d["is_draft"] = bool(result.as_numpy("is_draft").reshape(-1)[0])
    if "finish_reason" in names:
        d["finish_reason"] = result.as_numpy("finish_reason").reshape(-1)[0].decode()
    for name in ("num_input_tokens", "num_output_tokens"):
        if name in names:
            d[name] = int(result.as_numpy(name).reshape(-1)[0])
    for name in ("output_token_ids", "output_logprobs"):
        if name in names:
            d[name] = result.as_numpy(name).reshape(-1).tolist()
    for name in ("output_top_logprob_ids", "output_top_logprobs"):
        if name in names:
            a = result.as_numpy(name)
            d[name] = a.reshape(a.shape[-2:]).tolist()
    return d


def served_models(c) -> list[str]:
    """The dgemma models this server's repository holds (encoder/denoiser only where rendered), in MODELS order."""
    names = {m["name"] for m in c.get_model_repository_index(as_json=True).get("models", [])}
    return [m for m in (MODEL, ENCODER, DENOISER) if m in names]


def health(url: str) -> dict:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    try:
        return {"live": c.is_server_live(), "ready": c.is_server_ready(),
                "models": {m: c.is_model_ready(m) for m in served_models(c)}}
    except Exception as e:  # tritonclient raises InferenceServerException for a refused connection
        raise ServerError(f"no Triton server at {url} ({e}). Start one with: dgemma serve") from None
    finally:
        c.close()


def stats(url: str) -> dict:
    """Per model: requests, executions and executions by batch size (Triton's statistics over gRPC)."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    try:
        out = {}
        for m in served_models(c):
            st = c.get_inference_statistics(m, as_json=True)["model_stats"][0]
            out[m] = {"requests": int(st.get("inference_count", 0)), "executions": int(st.get("execution_count", 0)),
                      "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"])
                                  for b in st.get("batch_stats", [])}}
        return out
    except Exception as e:  # tritonclient raises InferenceServerException for a refused connection
        raise ServerError(f"no statistics from {url} ({e}). Start a server with: dgemma serve") from None
    finally:
        c.close()
