"""preprocess: LLM-shaped inputs -> one validated request (JSON: prompt ids + sampling settings).

Thin glue: parsing and validation live in dgemma.serving.canvas_loop.parse_request."""

import numpy as np
import triton_python_backend_utils as pb_utils

from dgemma.errors import DgemmaError
from dgemma.serving.canvas_loop import INPUTS, Limits, model_parameters, parse_request
from dgemma.tokens import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.limits = Limits.from_parameters(params)
        self.tok = Tokenizer(params["checkpoint"])

    def execute(self, requests):
        out = []
        for r in requests:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(r, name)
                if t is not None:
                    inputs[name] = t.as_numpy()
            try:
                req = parse_request(inputs, self.limits, self.tok.encode_chat)
            except DgemmaError as e:
                out.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(e).__name__}: {e}", pb_utils.TritonError.INVALID_ARG)))
                continue
            out.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("request", np.array([req.to_json().encode()], dtype=np.object_))]))
        return out
