"""The `encoder` and `denoiser` Triton models: the exported graphs' IO as Triton sees it, and the batch runner.

Names, dtypes and dims come from dgemma.graphs only. Every graph tensor starts with the `batch` dim, so the
Triton models have `max_batch_size` = GpuProfile.max_batch and list the other dims (symbolic -> -1); a tensor
that is only [batch] (temperature, past_length) is declared `dims: [ 1 ]` with `reshape: { shape: [ ] }`, so
callers send [B, 1] and the model sees [B]. `GraphRunner.run_batch` serves one Triton dynamic batch: it
concatenates the requests along dim 0, runs the graph once and splits the outputs by the requests' row counts.
Knows nothing of Triton's python API (the thin model.py moves tensors) and nothing of sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import graphs
from ..errors import ArtifactError, ConfigError

TRITON_DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16",
                 "bool": "TYPE_BOOL"}
RUNTIMES = ("onnxruntime", "torch")  # how the python `encoder`/`denoiser` models compute


def triton_dims(t: graphs.TensorSpec) -> tuple[list[int], bool]:
    """(dims without the batch dim, needs reshape to []) for a config.pbtxt with max_batch_size > 0."""
    if not t.dims or t.dims[0] != graphs.BATCH:
        raise ConfigError(f"graph tensor {t.name} {list(t.dims)} does not start with the batch dim; Triton's "
                          "batching needs it first (graphs.py).")
    rest = [d if isinstance(d, int) else -1 for d in t.dims[1:]]
    return (rest, False) if rest else ([1], True)


def io_block(specs: Sequence[graphs.TensorSpec]) -> str:
    """config.pbtxt rows for `input [ ... ]` / `output [ ... ]`."""
    rows = []
    for t in specs:
        dims, reshape = triton_dims(t)
        rows.append(f'  {{ name: "{t.name}" data_type: {TRITON_DTYPES[t.dtype]} dims: [ {", ".join(map(str, dims))} ]'
                    + (" reshape: { shape: [ ] }" if reshape else "") + " }")
    return ",\n".join(rows)


def wire_shape(t: graphs.TensorSpec, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a caller (BLS, a client) sends for a tensor of this spec: [B] tensors go as [B, 1]."""
    return (shape[0], 1) if len(t.dims) == 1 else tuple(shape)


def split_rows(arrays: Sequence[Any], rows: Sequence[int]) -> list[list[Any]]:
    """Per request, its rows of every output (numpy arrays or torch tensors)."""
    out, start = [], 0
    for n in rows:
        out.append([a[start : start + n] for a in arrays])
        start += n
    return out


class GraphRunner:
    """One graph (`encoder` or `denoiser`) on ONNX Runtime (CPU, numpy in/out; precision from the ONNX manifest) or
    torch (the export wrappers over the checkpoint cast to `precision`'s dtype, CUDA when visible; torch tensors
    in/out). `array_kind` tells model.py which to hand over."""

    def __init__(self, graph: str, runtime: str, onnx_dir: str | Path | None = None,
                 checkpoint: str | Path | None = None, threads: int | None = None, precision: str = "bf16"):
        if graph not in graphs.GRAPHS:
            raise ConfigError(f"unknown graph {graph!r}; valid: {', '.join(graphs.GRAPHS)}.")
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown graph runtime {runtime!r}; valid: {', '.join(RUNTIMES)}.")
        self.graph, self.runtime = graph, runtime
        if runtime == "onnxruntime":
            from ..runtime.ort_backend import OrtBackend

            if onnx_dir is None:
                raise ConfigError("runtime 'onnxruntime' needs onnx_dir (build/onnx/<precision>).")
            ort = OrtBackend(onnx_dir, checkpoint=checkpoint, threads=threads, graphs_to_load=(graph,))
            self.cfg, self.precision = ort.cfg, ort.precision
            self._session = ort.sessions[graph]
            self.array_kind = "numpy"
        else:
            import torch

            from ..checkpoint import load_checkpoint
            from ..export import DenoiserGraph, EncoderGraph

            if checkpoint is None:
                raise ConfigError("runtime 'torch' needs the checkpoint directory.")
            if threads:
                torch.set_num_threads(threads)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            # the checkpoint in the dtype of the graphs' precision (what the rendered config declares)
            model = load_checkpoint(Path(checkpoint), device=device, dtype=graphs.kv_dtype(precision)).model.eval()
            self.cfg, self.precision = model.cfg, precision
            self._module = (EncoderGraph if graph == graphs.ENCODER else DenoiserGraph)(model).eval()
            self.device = torch.device(device)
            self.array_kind = "torch"
        self.inputs = graphs.inputs(graph, self.cfg, self.precision)
        self.outputs = graphs.outputs(graph, self.cfg, self.precision)

    def run(self, feed: dict[str, Any]) -> list[Any]:
        if self.runtime == "onnxruntime":
            return self._session.run(None, {t.name: feed[t.name] for t in self.inputs})
        import torch

        from ..runtime.graph_backend import DTYPES

        with torch.no_grad():
            args = [feed[t.name].to(self.device, DTYPES[t.dtype]) for t in self.inputs]
            return [o.contiguous() for o in self._module(*args)]

    def run_batch(self, feeds: Sequence[dict[str, Any]]) -> list[list[Any]]:
        """One graph call for all feeds (Triton guarantees equal non-batch shapes inside a dynamic batch);
        -> per feed, its outputs in graphs.outputs order."""
        if len(feeds) == 1:
            return [self.run(feeds[0])]
        rows = [int(f[self.inputs[0].name].shape[0]) for f in feeds]
        if self.runtime == "onnxruntime":
            cat = {t.name: np.concatenate([f[t.name] for f in feeds]) for t in self.inputs}
        else:
            import torch

            cat = {t.name: torch.cat([f[t.name].to(self.device) for f in feeds]) for t in self.inputs}
        return split_rows(self.run(cat), rows)


def check_graph_artifacts(onnx_dir: str | Path) -> None:
    """Fail before starting Triton when the ONNX graphs the `encoder`/`denoiser` models load are missing."""
    m = Path(onnx_dir) / "manifest.json"
    if not m.exists():
        p = Path(onnx_dir).name
        raise ArtifactError(f"{m} not found: the encoder/denoiser models run the exported ONNX graphs. Export them "
                            f"with `make onnx PRECISION={p}` (dgemma export --precision {p}).")
