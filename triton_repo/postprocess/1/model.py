"""postprocess: generated ids -> text_output (+ canvas statistics passed through). Thin glue over dgemma.tokens."""

import numpy as np
import triton_python_backend_utils as pb_utils

from dgemma.serving.canvas_loop import model_parameters
from dgemma.tokens import Tokenizer

STATS = ("canvas_index", "canvases", "steps_per_canvas", "tokens_per_forward")


class TritonPythonModel:
    def initialize(self, args):
        self.tok = Tokenizer(model_parameters(args)["checkpoint"])

    def execute(self, requests):
        out = []
        for r in requests:
            ids = pb_utils.get_input_tensor_by_name(r, "output_ids").as_numpy().reshape(-1)
            text = self.tok.decode(ids.tolist())
            tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
            for name in STATS:
                tensors.append(pb_utils.Tensor(f"{name}_out", pb_utils.get_input_tensor_by_name(r, name).as_numpy()))
            out.append(pb_utils.InferenceResponse(tensors))
        return out
