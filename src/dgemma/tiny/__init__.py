"""Layer 3 of dgemma: the tiny models. Checkpoints in the real layout: the trained embedded default and the random
one for parity tests; the sorting task and its evaluation (task); the CPU trainer (train).

The embedded default (`DEFAULT_CHECKPOINT`, committed under dgemma/tiny/assets/tiny-sort) is a 1.2 M-parameter
DiffusionGemma trained on CPU to sort digits (dgemma.tiny.train). `write_tiny(dir)` writes a random tiny model
(config.json, generation_config.json, model.safetensors, byte-level tokenizer.json). Both load through exactly the
same code as the real checkpoint (dgemma.model.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import TINY, ModelConfig, SamplerConfig
from ..core.layout import DEFAULT_CHECKPOINT, current
from ..model.checkpoint import save_checkpoint
from ..model.modeling import DiffusionGemma
from ..model.tokens import build_byte_tokenizer

__all__ = ["DEFAULT_CHECKPOINT", "ensure_tiny", "tiny_sampler", "write_tiny"]


def tiny_sampler(cfg: ModelConfig = TINY) -> SamplerConfig:
    return SamplerConfig(max_new_tokens=2 * cfg.canvas_length, eos_token_ids=(1, 106, 50))


def write_tiny(out_dir: str | Path | None = None, seed: int = 0, cfg: ModelConfig = TINY) -> Path:
    """Random tiny model (seeded) + tokenizer, written atomically to out_dir (default build/checkpoints/tiny in the
    work directory)."""
    out_dir = out_dir or current().checkpoints / "tiny"
    model = DiffusionGemma.random(cfg, dtype=torch.float32, seed=seed)
    tok = build_byte_tokenizer(cfg.vocab_size)
    return save_checkpoint(model, out_dir, tiny_sampler(cfg), extra_files={"tokenizer.json": tok.to_str().encode()})


def ensure_tiny(path: str | Path | None = None) -> Path:
    """The embedded trained default, or (given a path) a random tiny checkpoint written there if missing."""
    if path is None:
        return DEFAULT_CHECKPOINT
    path = Path(path)
    if not (path / "config.json").exists():
        write_tiny(path)
    return path
