"""The `encoder` and `denoiser` Triton models: the exported graphs' IO as Triton sees it, and the batch runner.

Names, dtypes and dims come from dgemma.core.contract only (io_block / wire_shape there). Every graph tensor starts with the `batch` dim, so the
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
import torch

from ..core import contract
from ..core.errors import ArtifactError, ConfigError
from ..model.checkpoint import load_checkpoint
from ..model.static_passes import DenoiserGraph, EncoderGraph
from ..runtime.graph_backend import DTYPES
from ..runtime.ort_backend import OrtBackend

RUNTIMES = ("onnxruntime", "torch")  # how the python `encoder`/`denoiser` models compute


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
        if graph not in contract.GRAPHS:
            raise ConfigError(f"unknown graph {graph!r}; valid: {', '.join(contract.GRAPHS)}.")
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown graph runtime {runtime!r}; valid: {', '.join(RUNTIMES)}.")
        self.graph, self.runtime = graph, runtime
        if runtime == "onnxruntime":
            if onnx_dir is None:
                raise ConfigError("runtime 'onnxruntime' needs onnx_dir (build/onnx/<precision>).")
            ort = OrtBackend(onnx_dir, checkpoint=checkpoint, threads=threads, graphs_to_load=(graph,))
            self.cfg, self.precision = ort.cfg, ort.precision
            self._session = ort.sessions[graph]
            self.array_kind = "numpy"
        else:
            if checkpoint is None:
                raise ConfigError("runtime 'torch' needs the checkpoint directory.")
            if threads:
                torch.set_num_threads(threads)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            # the checkpoint in the dtype of the graphs' precision (what the rendered config declares)
            model = load_checkpoint(Path(checkpoint), device=device, dtype=contract.kv_dtype(precision)).model.eval()
            self.cfg, self.precision = model.cfg, precision
            self._module = (EncoderGraph if graph == contract.ENCODER else DenoiserGraph)(model).eval()
            self.device = torch.device(device)
            self.array_kind = "torch"
        self.inputs = contract.inputs(graph, self.cfg, self.precision)
        self.outputs = contract.outputs(graph, self.cfg, self.precision)

    def run(self, feed: dict[str, Any]) -> list[Any]:
        if self.runtime == "onnxruntime":
            return self._session.run(None, {t.name: feed[t.name] for t in self.inputs})
        with torch.no_grad():
            args = [feed[t.name].to(self.device, DTYPES[t.dtype]) for t in self.inputs]
            return [o.contiguous() for o in self._module(*args)]

    def run_batch(self, feeds: Sequence[dict[str, Any]]) -> list[list[Any]]:
        """One graph call for all feeds (Triton guarantees equal non-batch shapes inside a dynamic batch);
        -> per feed, its outputs in contract.outputs order."""
        if len(feeds) == 1:
            return [self.run(feeds[0])]
        rows = [int(f[self.inputs[0].name].shape[0]) for f in feeds]
        if self.runtime == "onnxruntime":
            cat = {t.name: np.concatenate([f[t.name] for f in feeds]) for t in self.inputs}
        else:
            cat = {t.name: torch.cat([f[t.name].to(self.device) for f in feeds]) for t in self.inputs}
        return split_rows(self.run(cat), rows)


def check_graph_artifacts(onnx_dir: str | Path) -> None:
    """Fail before starting Triton when the ONNX graphs the `encoder`/`denoiser` models load are missing."""
    m = Path(onnx_dir) / "manifest.json"
    if not m.exists():
        p = Path(onnx_dir).name
        raise ArtifactError(f"{m} not found: the encoder/denoiser models run the exported ONNX graphs. Export them "
                            f"with `make onnx PRECISION={p}` (dgemma onnx --precision {p}).")
