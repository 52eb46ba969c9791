"""One request over a gRPC stream with tensors sent exactly as given (name -> numpy array, that shape and dtype):
what a hostile client or another frontend sends, without dgemma.serving.client's encoding."""

from __future__ import annotations

import queue

import numpy as np


def send(url: str, tensors: dict[str, np.ndarray], model: str = "dgemma", timeout_s: float = 60.0):
    """-> every result up to the final flag, or the error's text when the server refuses the request."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, a in tensors.items():
        t = grpcclient.InferInput(name, list(a.shape), "BYTES" if a.dtype == object else np_to_triton_dtype(a.dtype))
        t.set_data_from_numpy(a)
        inputs.append(t)
    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        c.async_stream_infer(model, inputs, enable_empty_final_response=True)
        out = []
        while True:
            result, error = got.get(timeout=timeout_s)
            if error is not None:
                return str(error)
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        c.stop_stream()
        c.close()
