"""encoder / denoiser (python): one exported graph, a Triton dynamic batch per call.

Thin glue: the graph's IO and the batch runner live in dgemma.serving.graph_models; this file only moves tensors
(numpy for ONNX Runtime, DLPack for torch) and maps errors: a failure answers each request of the batch with one
line (INTERNAL) and writes the traceback to the server log only."""

import traceback

import triton_python_backend_utils as pb_utils

from dgemma.serving.graph_models import GraphRunner
from dgemma.serving.loop import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        self.runner = GraphRunner(p["graph"], p["runtime"], onnx_dir=p.get("onnx_dir") or None,
                                  checkpoint=p["checkpoint"], threads=int(p["threads"]) if p.get("threads") else None,
                                  precision=p["graph_precision"])
        self.numpy = self.runner.array_kind == "numpy"
        if not self.numpy:
            from torch.utils.dlpack import from_dlpack

            self.from_dlpack = from_dlpack

    def _get(self, r, name):
        t = pb_utils.get_input_tensor_by_name(r, name)
        return t.as_numpy() if self.numpy else self.from_dlpack(t.to_dlpack())

    def execute(self, requests):
        try:
            feeds = [{t.name: self._get(r, t.name) for t in self.runner.inputs} for r in requests]
            outs = self.runner.run_batch(feeds)
        except Exception as e:
            pb_utils.Logger.log_error(f"{self.runner.graph}: {traceback.format_exc()}")
            msg = f"{self.runner.graph} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INTERNAL))
                    for _ in requests]
        wrap = pb_utils.Tensor if self.numpy else pb_utils.Tensor.from_dlpack
        return [pb_utils.InferenceResponse([wrap(t.name, o) for t, o in zip(self.runner.outputs, out)])
                for out in outs]
