"""Backend over the exported `encoder` and `denoiser` ONNX graphs with ONNX Runtime (CPU).

Owns `OrtBackend`: loads build/onnx/<precision>/ after checking its manifest (files, IO contract, checkpoint)
and runs the graphs' feeds through ONNX Runtime sessions; the KV state (fixed-capacity CPU buffers, per-row
lengths) and the Backend protocol come from GraphBackend, the buffers cross to ONNX Runtime without copies
(torch CPU tensors as numpy views). Names and dims come from dgemma.core.contract. Knows nothing of sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..core import contract
from ..core.config import ModelConfig
from ..core.errors import ArtifactError
from ..core.manifest import (check_quantize_source, checkpoint_fingerprint, read_onnx_manifest,
                             verify_onnx_files)
from .graph_backend import DTYPES, GraphBackend

REBUILD = "Rebuild with `make onnx PRECISION={p}` (dgemma onnx --precision {p})."
# ONNX Runtime's QDQ fusions turn FP8 DQ->MatMul into MatMulIntegerToFloat, which has no FP8 kernel ("Type
# 'tensor(float8e4m3fn)' of input parameter ... is invalid"); with this entry ORT runs the Q/DQ nodes as written.
ORT_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


class OrtBackend(GraphBackend):
    def __init__(self, onnx_dir: str | Path, checkpoint: str | Path | None = None, max_context: int | None = None,
                 cfg: ModelConfig | None = None, threads: int | None = None, verify: bool = True,
                 graphs_to_load: tuple[str, ...] = contract.GRAPHS):
        import onnxruntime as ort

        self.onnx_dir = Path(onnx_dir)
        m = read_onnx_manifest(self.onnx_dir)
        self.manifest = m
        self.precision = m.get("precision", "?")
        fix = REBUILD.format(p=self.precision)
        self.cfg = ModelConfig.from_hf_dict(m["model_config"], source=str(self.onnx_dir / "manifest.json"))
        if cfg is not None and cfg != self.cfg:
            diff = [k for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(self.cfg, k)]
            raise ArtifactError(f"{self.onnx_dir}: graphs were exported for a different model config "
                                f"({', '.join(f'{k}: graphs {getattr(self.cfg, k)!r} vs model {getattr(cfg, k)!r}' for k in diff[:3])}). {fix}")
        want = contract.contract_hash(self.cfg, self.precision)
        if m.get("contract_sha256") != want:
            raise ArtifactError(f"{self.onnx_dir}: IO contract {m.get('contract_sha256')} in the manifest, this dgemma "
                                f"expects {want} (contract.py changed since export). {fix}")
        if checkpoint is not None:
            got = checkpoint_fingerprint(checkpoint)
            if m.get("checkpoint_sha256") != got:
                raise ArtifactError(f"{self.onnx_dir}: exported from checkpoint {m.get('checkpoint')} "
                                    f"(sha256 {str(m.get('checkpoint_sha256'))[:12]}...), but {checkpoint} has sha256 "
                                    f"{got[:12]}... (stale ONNX). {fix}")
        if verify:
            verify_onnx_files(self.onnx_dir, m)
        if self.precision == "nvfp4":
            raise ArtifactError(f"{self.onnx_dir}: precision 'nvfp4' graphs hold FLOAT4E2M1 weights and "
                                "trt::TRT_FP4DynamicQuantize activations, which ONNX Runtime cannot run (TensorRT-RTX, "
                                "SM120+, only: `make engines PRECISION=nvfp4`). Use fp8 or fp32 graphs with ONNX "
                                "Runtime: `make onnx PRECISION=fp8` (after `make quantize PRECISION=fp8`).")
        check_quantize_source(self.onnx_dir, m)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for k, v in ORT_SESSION_CONFIG.items():  # FP8 Q/DQ as written (harmless for plain graphs)
            so.add_session_config_entry(k, v)
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = {}
        for g in graphs_to_load:  # Triton's `encoder`/`denoiser` models each load their own graph
            path = self.onnx_dir / g / "model.onnx"
            try:
                self.sessions[g] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
                raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]}). {fix}") from None
            names = [i.name for i in self.sessions[g].get_inputs()]
            expect = [t.name for t in contract.inputs(g, self.cfg, self.precision)]
            if names != expect:
                raise ArtifactError(f"{path}: inputs {names[:4]}... differ from contract.py {expect[:4]}.... {fix}")
        self.device = torch.device("cpu")
        self.max_context = max_context or min(self.cfg.max_position_embeddings, 8192)
        self._setup()
        if contract.kv_dtype(self.precision) != "float32":
            raise ArtifactError(f"{self.onnx_dir}: precision {self.precision!r} graphs hold bf16 tensors, which ONNX "
                                "Runtime's CPU provider does not run; export with --precision fp32 for ORT, or build "
                                "engines (`make engines`).")

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        arrays = {t.name: feed[t.name].to("cpu", DTYPES[t.dtype]).contiguous().numpy()
                  for t in contract.inputs(graph, self.cfg, self.precision)}
        return [torch.from_numpy(a) for a in self.sessions[graph].run(None, arrays)]
