"""postprocess (the `ensemble` rendering's last step): token ids -> text, with the checkpoint's tokenizer (special
tokens and pads dropped, as the dgemma model's own text). Thin glue."""

import numpy as np
import triton_python_backend_utils as pb_utils

from dgemma.model.tokens import Tokenizer
from dgemma.serving.loop import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        self.tok = Tokenizer(model_parameters(args)["checkpoint"])

    def execute(self, requests):
        out = []
        for r in requests:
            ids = pb_utils.get_input_tensor_by_name(r, "output_ids").as_numpy().reshape(-1).tolist()
            text = np.array([[self.tok.decode(ids).encode("utf-8")]], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", text)]))
        return out
