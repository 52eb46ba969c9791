"""preprocess (the `ensemble` rendering's first step): the dgemma model's inputs -> the validated request (chat
template applied, tokens, sampler settings) as JSON for canvas_loop. Thin glue over dgemma.serving.request."""

import numpy as np
import triton_python_backend_utils as pb_utils

from dgemma.core.contract import MODEL_INPUTS, REQUEST
from dgemma.core.errors import RequestError
from dgemma.model.tokens import Tokenizer
from dgemma.serving.loop import model_parameters
from dgemma.serving.request import Limits, parse_request


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.limits = Limits.from_parameters(params)
        self.tok = Tokenizer(params["checkpoint"])

    def execute(self, requests):
        out = []
        for r in requests:
            inputs = {}
            for name in MODEL_INPUTS:
                t = pb_utils.get_input_tensor_by_name(r, name)
                if t is not None:
                    inputs[name] = t.as_numpy()
            try:
                req = parse_request(inputs, self.limits, self.tok)
            except RequestError as e:
                out.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(e).__name__}: {e}", pb_utils.TritonError.INVALID_ARG)))
                continue
            arr = np.array([[req.to_json().encode()]], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(REQUEST, arr)]))
        return out
