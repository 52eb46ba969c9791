"""Backend over the two TensorRT engines (engines/<gpu>/<precision>/{encoder,denoiser}.plan) on a CUDA GPU.

Owns `TrtBackend`: checks the engine manifest against this machine before deserializing (GPU compute
capability, TensorRT flavour and version: an engine built for another GPU or TensorRT is refused with both
sides named and the make command that rebuilds it) and binds torch CUDA tensors by name from dgemma.graphs; the
KV state and the Backend protocol come from GraphBackend (fixed-capacity torch buffers on the GPU). Uses `tensorrt` where
importable, `tensorrt_rtx` otherwise (the flavour the engines were built with must match). Knows nothing of
sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..core import contract
from ..core.config import ModelConfig
from ..core.errors import ArtifactError, ConfigError
from ..core.manifest import check_engines
from .graph_backend import DTYPES, GraphBackend


def import_tensorrt(required_for: str = "TensorRT engines"):
    """-> (module, flavour): full TensorRT (`tensorrt`, NGC containers) where importable, else TensorRT-RTX
    (`tensorrt_rtx`, pip install -e '.[export]'); ConfigError naming both when neither is."""
    try:
        import tensorrt as trt

        return trt, "tensorrt"
    except ImportError:
        pass
    try:
        import tensorrt_rtx as trt
    except ImportError:
        raise ConfigError(f"{required_for} need `tensorrt` (NGC container) or `tensorrt_rtx` (pip install -e "
                          "'.[export]'); neither is importable. Without them use --backend ort (CPU) or --backend "
                          "fast (CUDA, torch).") from None
    return trt, "tensorrt_rtx"


def check_compatible(manifest: dict, device_sm: int, device_name: str, flavour: str, version: str) -> None:
    """Refuse engines built for another GPU or another TensorRT, naming both sides and the rebuild command.

    device_sm: compute capability x10 of this GPU; flavour/version: the TensorRT module imported here.
    """
    gpu = manifest.get("gpu_profile", {}).get("name", "?")
    rebuild = f"Rebuild on this machine: `make engines GPU=<this gpu> PRECISION={manifest.get('precision', '?')}`."
    built = manifest.get("tensorrt", {})
    if built.get("flavour") != flavour or built.get("version") != version:
        raise ArtifactError(f"engines were built with {built.get('flavour')} {built.get('version')} (profile {gpu}); "
                            f"this machine imports {flavour} {version}. Engines are not portable across TensorRT "
                            f"versions. {rebuild}")
    sms = [int(s) for s in manifest.get("compute_capabilities", [])]
    if device_sm not in sms:
        want = ", ".join(f"SM{s}" for s in sms) or "none recorded"
        raise ArtifactError(f"engines were built for {want} (profile {gpu}); this GPU is {device_name} (SM{device_sm}). "
                            f"TensorRT engines only run on the compute capabilities they were built for. {rebuild}")


class TrtBackend(GraphBackend):
    def __init__(self, engine_dir: str | Path, max_context: int | None = None, device: int | str = 0):
        self.engine_dir = Path(engine_dir)
        m = check_engines(self.engine_dir)  # refuses engines whose ONNX changed since they were built
        if not torch.cuda.is_available():
            raise ConfigError(f"TrtBackend runs engines on a CUDA GPU and none is visible (engines: {self.engine_dir}). "
                              "Use --backend ort for the CPU form.")
        trt, flavour = import_tensorrt("TrtBackend")
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        major, minor = torch.cuda.get_device_capability(self.device)
        check_compatible(m, major * 10 + minor, torch.cuda.get_device_name(self.device), flavour, trt.__version__)
        if "model_config" not in m:
            raise ArtifactError(f"{self.engine_dir}/manifest.json lacks model_config (built by an older dgemma); "
                                "rebuild with `make engines`.")
        self.manifest = m
        self.precision = m["onnx_precision"]
        self.cfg = ModelConfig.from_hf_dict(m["model_config"], source=str(self.engine_dir / "manifest.json"))
        if m.get("contract_sha256") != contract.contract_hash(self.cfg, self.precision):
            raise ArtifactError(f"{self.engine_dir}: IO contract {m.get('contract_sha256')} differs from this dgemma's "
                                f"{contract.contract_hash(self.cfg, self.precision)}; rebuild with `make onnx` and "
                                "`make engines`.")
        cap_max = m["gpu_profile"]["max_context"]
        self.max_context = min(max_context or cap_max, cap_max)
        self.limit_source = f"engine profile {m['gpu_profile']['name']}"
        self._setup()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines, self._contexts = {}, {}
        for g in contract.GRAPHS:
            path = self.engine_dir / f"{g}.plan"
            try:
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            except FileNotFoundError:
                raise ArtifactError(f"{path} not found; rebuild with `make engines`.") from None
            if engine is None:
                raise ArtifactError(f"{path}: TensorRT ({flavour} {trt.__version__}) cannot deserialize it (corrupt, "
                                    "or built for another GPU/TensorRT; see the log above). Rebuild with `make engines`.")
            self._engines[g] = engine
            self._contexts[g] = self._context(engine, flavour, g)
        self._stream = torch.cuda.Stream(self.device)

    def _context(self, engine, flavour: str, graph: str):
        """Execution context; with TensorRT-RTX, a runtime cache (JIT-compiled kernels) kept beside the engines
        and whole-graph CUDA graph capture."""
        if flavour != "tensorrt_rtx":
            return engine.create_execution_context()
        trt = import_tensorrt()[0]
        rc = engine.create_runtime_config()
        cache = rc.create_runtime_cache()
        path = self.engine_dir / f"{graph}.runtime.cache"
        if path.exists():
            cache.deserialize(path.read_bytes())
        rc.set_runtime_cache(cache)
        rc.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self._caches = getattr(self, "_caches", {}) | {graph: (rc, cache, path)}
        return engine.create_execution_context(rc)

    def save_runtime_cache(self) -> None:
        """Persist TensorRT-RTX's JIT runtime cache next to the engines (atomic), so the next load skips JIT."""
        for _rc, cache, path in getattr(self, "_caches", {}).values():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(bytes(cache.serialize()))
            tmp.replace(path)

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        ctx = self._contexts[graph]
        for t in contract.inputs(graph, self.cfg, self.precision):
            x = feed[t.name].to(self.device, DTYPES[t.dtype]).contiguous()
            feed[t.name] = x  # keep alive until the stream is done
            ctx.set_input_shape(t.name, tuple(x.shape))
            ctx.set_tensor_address(t.name, x.data_ptr())
        outs = []
        for t in contract.outputs(graph, self.cfg, self.precision):
            y = torch.empty(tuple(ctx.get_tensor_shape(t.name)), dtype=DTYPES[t.dtype], device=self.device)
            ctx.set_tensor_address(t.name, y.data_ptr())
            outs.append(y)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT {graph} engine failed to execute (see the TensorRT log above).")
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return outs
