"""Backend over Triton's `encoder` and `denoiser` models through BLS (Business Logic Scripting) requests.

Runs inside a Triton python model (canvas_loop): each graph call becomes a `pb_utils.InferenceRequest(...).exec()`
to the model named after the graph, with the graph's tensor names from dgemma.graphs. The KV state stays here,
in canvas_loop, exactly as OrtBackend keeps it (this class reuses OrtBackend's state handling and swaps its ONNX
Runtime sessions for BLS calls), so every request drives its own B=1 sampler and the `denoiser` model's dynamic
batcher merges concurrent requests' steps into one graph call. Knows nothing of sampling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import graphs
from ..config import ModelConfig
from ..errors import ArtifactError, DgemmaError
from .ort_backend import OrtBackend


class BlsError(DgemmaError):
    """A BLS request to the encoder or denoiser model failed (the model's message is included)."""


class BlsSession:
    """`run(None, feed) -> [outputs]` like an onnxruntime.InferenceSession, answered by the Triton model `graph`."""

    def __init__(self, graph: str, cfg: ModelConfig, precision: str, pb_utils: Any, model_name: str | None = None):
        from ..serving.graph_models import wire_shape

        self.graph, self.model_name = graph, model_name or graph
        self.inputs = graphs.inputs(graph, cfg, precision)
        self.output_names = [t.name for t in graphs.outputs(graph, cfg, precision)]
        self._wire = wire_shape
        self._pb = pb_utils
        self.calls = 0

    def run(self, _output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        pb = self._pb
        tensors = [pb.Tensor(t.name, np.ascontiguousarray(feed[t.name]).reshape(self._wire(t, feed[t.name].shape)))
                   for t in self.inputs]
        resp = pb.InferenceRequest(model_name=self.model_name, requested_output_names=self.output_names,
                                   inputs=tensors).exec()
        if resp.has_error():
            raise BlsError(f"BLS request to model {self.model_name!r} failed: {resp.error().message()}")
        self.calls += 1
        return [pb.get_output_tensor_by_name(resp, n).as_numpy() for n in self.output_names]


class BlsBackend(OrtBackend):
    """OrtBackend's KV handling over BLS sessions. Numpy tensors, so the graphs' precision must be fp32 (the ONNX
    Runtime python models); bf16 engines (tensorrt_plan) would need a torch/DLPack variant of the state."""

    def __init__(self, cfg: ModelConfig, precision: str, max_context: int | None = None, pb_utils: Any = None,
                 model_names: dict[str, str] | None = None):
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils  # only inside a Triton python model
        if graphs.kv_dtype(precision) != "float32":
            raise ArtifactError(f"canvas_loop backend 'bls' exchanges numpy tensors; the encoder/denoiser models run "
                                f"{precision} graphs ({graphs.kv_dtype(precision)}). Render with --engine onnxruntime "
                                "(fp32 graphs) or use canvas_loop --backend torch.")
        self.cfg, self.precision = cfg, precision
        self.vocab_size, self.canvas_length, self.hidden_size = cfg.vocab_size, cfg.canvas_length, cfg.hidden_size
        self.device = torch.device("cpu")
        self.max_context = max_context or min(cfg.max_position_embeddings, 8192)
        self._np_dtype = np.float32
        names = model_names or {}
        self.sessions = {g: BlsSession(g, cfg, precision, pb_utils, names.get(g)) for g in graphs.GRAPHS}
