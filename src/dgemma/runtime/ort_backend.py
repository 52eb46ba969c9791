"""Backend over the exported `encoder` and `denoiser` ONNX graphs with ONNX Runtime (CPU).

Owns `OrtBackend`: loads build/onnx/<precision>/ after checking its manifest (files, IO contract, checkpoint),
and keeps the KV state as fixed-capacity numpy buffers between calls (contract v2: max_context slots for full
layers, W-1 for sliding layers, per-row lengths; dgemma.runtime.kvbuf appends the encoder's new K/V). Names and
dims come from dgemma.graphs. Knows nothing of sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import graphs
from . import kvbuf
from ..config import ModelConfig
from ..errors import ArtifactError, RequestError

REBUILD = "Rebuild with `make onnx` (dgemma export --precision {p} --checkpoint CKPT)."


@dataclass
class OrtState:
    batch: int
    lengths: list[int] = field(default_factory=list)  # cached tokens per row
    kv: list[np.ndarray] = field(default_factory=list)  # past_key_0, past_value_0, ... buffers in contract order


class OrtBackend:
    def __init__(self, onnx_dir: str | Path, checkpoint: str | Path | None = None, max_context: int | None = None,
                 cfg: ModelConfig | None = None, threads: int | None = None, verify: bool = True,
                 graphs_to_load: tuple[str, ...] = graphs.GRAPHS):
        import onnxruntime as ort

        from ..export import checkpoint_fingerprint, read_manifest, verify_files

        self.onnx_dir = Path(onnx_dir)
        m = read_manifest(self.onnx_dir)
        self.manifest = m
        self.precision = m.get("precision", "?")
        fix = REBUILD.format(p=self.precision)
        self.cfg = ModelConfig.from_hf_dict(m["model_config"], source=str(self.onnx_dir / "manifest.json"))
        if cfg is not None and cfg != self.cfg:
            diff = [k for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(self.cfg, k)]
            raise ArtifactError(f"{self.onnx_dir}: graphs were exported for a different model config "
                                f"({', '.join(f'{k}: graphs {getattr(self.cfg, k)!r} vs model {getattr(cfg, k)!r}' for k in diff[:3])}). {fix}")
        want = graphs.contract_hash(self.cfg, self.precision)
        if m.get("contract_sha256") != want:
            raise ArtifactError(f"{self.onnx_dir}: IO contract {m.get('contract_sha256')} in the manifest, this dgemma "
                                f"expects {want} (graphs.py changed since export). {fix}")
        if checkpoint is not None:
            got = checkpoint_fingerprint(checkpoint)
            if m.get("checkpoint_sha256") != got:
                raise ArtifactError(f"{self.onnx_dir}: exported from checkpoint {m.get('checkpoint')} "
                                    f"(sha256 {str(m.get('checkpoint_sha256'))[:12]}...), but {checkpoint} has sha256 "
                                    f"{got[:12]}... (stale ONNX). {fix}")
        if verify:
            verify_files(self.onnx_dir, m)
        if self.precision == "nvfp4":
            raise ArtifactError(f"{self.onnx_dir}: precision 'nvfp4' graphs hold FLOAT4E2M1 weights and "
                                "trt::TRT_FP4DynamicQuantize activations, which ONNX Runtime cannot run (TensorRT-RTX, "
                                "SM120+, only: `make engines PRECISION=nvfp4`). Use fp8 or fp32 graphs with ONNX "
                                "Runtime: `make onnx PRECISION=fp8` (after `make quantize PRECISION=fp8`).")
        from ..export_quant import ORT_SESSION_CONFIG, check_quantize_source

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
            expect = [t.name for t in graphs.inputs(g, self.cfg, self.precision)]
            if names != expect:
                raise ArtifactError(f"{path}: inputs {names[:4]}... differ from graphs.py {expect[:4]}.... {fix}")
        self.vocab_size = self.cfg.vocab_size
        self.canvas_length = self.cfg.canvas_length
        self.hidden_size = self.cfg.hidden_size
        self.device = torch.device("cpu")
        self.max_context = max_context or min(self.cfg.max_position_embeddings, 8192)
        self._np_dtype = np.float32 if graphs.kv_dtype(self.precision) == "float32" else None
        if self._np_dtype is None:
            raise ArtifactError(f"{self.onnx_dir}: precision {self.precision!r} graphs hold bf16 tensors, which ONNX "
                                "Runtime's CPU provider does not run; export with --precision fp32 for ORT, or build "
                                "engines (`make engines`).")

    # -- Backend protocol ---------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> OrtState:
        kv = [np.zeros(shape, dtype=self._np_dtype) for shape in kvbuf.shapes(self.cfg, batch, self.max_context)]
        return OrtState(batch, [0] * batch, kv)

    def length(self, state: OrtState) -> int:
        return state.lengths[0]

    def _positions(self, state: OrtState, n: int) -> np.ndarray:
        return np.asarray(state.lengths, dtype=np.int64)[:, None] + np.arange(n, dtype=np.int64)[None, :]

    def _past_feed(self, state: OrtState) -> dict[str, np.ndarray]:
        names = [t.name for t in graphs.past(self.cfg, self.precision)]
        return {graphs.PAST_LENGTH: np.asarray(state.lengths, dtype=np.int64), **dict(zip(names, state.kv))}

    def _check_room(self, state: OrtState, ids: Tensor) -> None:
        if ids.shape[0] != state.batch:
            raise RequestError(f"batch of {ids.shape[0]} rows, but the state was created for {state.batch}.")
        if max(state.lengths) + ids.shape[1] > self.max_context:
            raise RequestError(
                f"context of {max(state.lengths) + ids.shape[1]} tokens exceeds max_context={self.max_context} "
                f"({max(state.lengths)} cached + {ids.shape[1]} new). Shorten the prompt, lower max_new_tokens, or "
                "raise max_context.")

    @torch.no_grad()
    def encode(self, state: OrtState, ids: Tensor) -> None:
        self._check_room(state, ids)
        n = ids.shape[1]
        feed = {"input_ids": ids.to("cpu", torch.int64).numpy(), "position_ids": self._positions(state, n),
                **self._past_feed(state)}
        new = self.sessions[graphs.ENCODER].run(None, feed)
        state.lengths = kvbuf.append(self.cfg, state.kv, new, state.lengths)

    @torch.no_grad()
    def denoise(self, state: OrtState, canvas: Tensor, soft: Tensor | None, temperature: Tensor):
        self._check_room(state, canvas)
        b, c = canvas.shape
        sc = (np.zeros((b, c, self.hidden_size), dtype=self._np_dtype) if soft is None
              else soft.to("cpu", torch.float32).numpy())
        temp = np.broadcast_to(temperature.to("cpu", torch.float32).numpy().reshape(-1), (b,)).copy()
        feed = {"canvas_ids": canvas.to("cpu", torch.int64).numpy(), "sc_embeds": sc, "temperature": temp,
                "position_ids": self._positions(state, c), **self._past_feed(state)}
        logits, nxt = self.sessions[graphs.DENOISER].run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(nxt)

    # -- for tests/inspection -----------------------------------------------------------------------------------
    def kv_tensors(self, state: OrtState) -> list[Tensor]:
        """The valid prefix of every K/V buffer (rows share one length here)."""
        n = state.lengths[0]
        return [torch.from_numpy(a[:, :, :kvbuf.valid(self.cfg, j // 2, n)]) for j, a in enumerate(state.kv)]
