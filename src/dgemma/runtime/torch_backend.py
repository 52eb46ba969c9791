"""Backends over the native torch model: `TorchBackend` (the native passes with a shared-length KVCache: the CPU
reference and plain CUDA eager path) and `TorchGraphBackend` (the static passes with per-row lengths, for
batching requests at different positions)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import contract
from ..core.errors import ConfigError
from ..model.modeling import DiffusionGemma, KVCache
from ..model.static_passes import DenoiserGraph, EncoderGraph
from .graph_backend import DTYPES, GraphBackend


class TorchBackend:
    def __init__(self, model: DiffusionGemma, max_context: int | None = None):
        self.model = model
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.canvas_length = cfg.canvas_length
        self.device = model.device
        self.max_context = max_context or min(cfg.max_position_embeddings, 8192)

    def new_state(self, batch: int) -> KVCache:
        return self.model.new_cache(batch, self.max_context)

    def length(self, state: KVCache) -> int:
        return state.length

    @torch.no_grad()
    def encode(self, state: KVCache, ids: Tensor) -> None:
        self.model.encode(ids, state)

    @torch.no_grad()
    def ar_step(self, state: KVCache, ids: Tensor) -> Tensor:
        """Autoregressive baseline: causal pass over ids [B,S] returning next-token logits [B,V]."""
        return self.model.encode(ids, state, last_logits=True)

    @torch.no_grad()
    def denoise(self, state: KVCache, canvas: Tensor, soft: Tensor | None, temperature: Tensor):
        raw = self.model.denoise(canvas, soft, state)
        return raw, self.model.soft_embed(raw / temperature)


class TorchGraphBackend(GraphBackend):
    """The two static passes (dgemma.model.static_passes) run by torch over fixed-capacity KV buffers: per-row
    positions, so rows of a batch may sit at different lengths (what the in-flight batching scheduler needs) —
    the same arithmetic the exported graphs hold. Precision = the model's dtype (fp32 or bf16 graphs; an FP8
    model keeps its FP8 linear modules inside the passes).

    On the CPU a row's numbers do not depend on the other rows of its call (the scheduler's promise that a
    request's answer is the one it gets alone): the experts run as the exported graphs run them (every expert
    on every token, one GEMM of all the call's tokens per expert, instead of per-expert groups of a few tokens),
    and encoder calls of fewer than MIN_TOKENS tokens per row are padded at the end (causal: the real tokens
    never see the pads; their K/V are dropped), because CPU GEMMs over fewer than 4 rows take a path that
    rounds differently (measured: MKL, fp32, up to 2e-5 apart). On CUDA the grouped experts stay."""

    MIN_TOKENS = 4

    def __init__(self, model: DiffusionGemma, max_context: int | None = None):
        self.cfg, self.device = model.cfg, model.device
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model.dtype)
        if self.precision is None:
            raise ConfigError(f"TorchGraphBackend runs float32 or bfloat16 models (got {model.dtype}).")
        self.max_context = max_context or min(self.cfg.max_position_embeddings, 8192)
        self._setup()
        if self.device.type == "cpu":
            model.set_experts_impl("dense")
        self._passes = {contract.ENCODER: EncoderGraph(model).eval(), contract.DENOISER: DenoiserGraph(model).eval()}

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        s = feed["input_ids"].shape[1] if graph == contract.ENCODER else 0
        pad = self.MIN_TOKENS - s if self.device.type == "cpu" and 0 < s < self.MIN_TOKENS else 0
        if pad:
            ids, pos = feed["input_ids"], feed["position_ids"]
            more = pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)
            feed = {**feed, "input_ids": torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1),
                    "position_ids": torch.cat([pos, more], 1)}
        args = [feed[t.name].to(self.device, DTYPES[t.dtype]) for t in contract.inputs(graph, self.cfg, self.precision)]
        out = list(self._passes[graph](*args))
        return [o[:, :, :s] for o in out] if pad else out
