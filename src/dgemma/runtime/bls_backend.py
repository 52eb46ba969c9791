"""Backend over Triton's `encoder` and `denoiser` models through BLS (Business Logic Scripting) requests.

Runs inside the Triton python model `dgemma`: each graph call becomes a `pb_utils.InferenceRequest(...).exec()`
to the model named after the graph, with the graph's tensor names and dtypes from dgemma.core.contract. The KV state
stays here, in the dgemma model: GraphBackend's fixed-capacity torch buffers (the same state TrtBackend keeps;
this class only supplies the graph call), on the CPU or a CUDA device, in fp32 or bf16 (tensors cross by DLPack). Every request drives its own
B=1 sampler; the `denoiser` model's dynamic batcher merges concurrent requests' steps (equal shapes: capacity =
max_context) into one graph call. Knows nothing of sampling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import contract
from ..core.config import ModelConfig
from .graph_backend import DTYPES, GraphBackend


class BlsError(RuntimeError):
    """A BLS request to the encoder or denoiser model failed (the model's message is included). An internal fault of
    the server, not a bad request: clients get UNAVAILABLE/INTERNAL, never INVALID_ARG."""


class BlsBackend(GraphBackend):
    def __init__(self, cfg: ModelConfig, precision: str, max_context: int, device: str | torch.device = "cpu",
                 pb_utils: Any = None, model_names: dict[str, str] | None = None, target: str = "?"):
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils  # only inside a Triton python model
        self._pb = pb_utils
        self.cfg, self.precision = cfg, precision
        self.device = torch.device(device)
        self.max_context = max_context
        self.limit_source = f"repository rendered for {target}"
        self._setup()
        self._names = {g: (model_names or {}).get(g, g) for g in contract.GRAPHS}
        self._specs = {g: (contract.inputs(g, cfg, precision), contract.outputs(g, cfg, precision)) for g in contract.GRAPHS}
        self.calls = {g: 0 for g in contract.GRAPHS}

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        from torch.utils.dlpack import from_dlpack

        pb = self._pb
        ins, outs = self._specs[graph]
        tensors = []
        for t in ins:  # [B] tensors travel as [B, 1] (config: dims [1], reshape [])
            x = feed[t.name].to(self.device, DTYPES[t.dtype])
            tensors.append(pb.Tensor.from_dlpack(t.name, x.reshape(contract.wire_shape(t, x.shape)).contiguous()))
        resp = pb.InferenceRequest(model_name=self._names[graph], requested_output_names=[t.name for t in outs],
                                   inputs=tensors).exec()
        if resp.has_error():
            raise BlsError(f"BLS request to model {self._names[graph]!r} failed: {resp.error().message()}")
        self.calls[graph] += 1
        return [from_dlpack(pb.get_output_tensor_by_name(resp, t.name).to_dlpack()).to(self.device) for t in outs]
