"""Backend over the native torch model (CPU reference and plain CUDA eager path)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.modeling import DiffusionGemma, KVCache


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
