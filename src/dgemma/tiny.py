"""Tiny checkpoints in the real layout: the trained embedded default and the random one for parity tests.

The embedded default (`DEFAULT_CHECKPOINT`, committed under dgemma/assets/tiny-sort) is a 1.2 M-parameter
DiffusionGemma trained on CPU to sort digits (dgemma.train). `write_tiny(dir)` writes a random tiny model
(config.json, generation_config.json, model.safetensors, byte-level tokenizer.json). Both load through
exactly the same code as the real checkpoint (dgemma.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import TINY, ModelConfig, SamplerConfig
from .model import DiffusionGemma
from .tokens import build_byte_tokenizer

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "build" / "checkpoints" / "tiny"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny-sort"


def tiny_sampler(cfg: ModelConfig = TINY) -> SamplerConfig:
    return SamplerConfig(max_new_tokens=2 * cfg.canvas_length, eos_token_ids=(1, 106, 50))


def write_tiny(out_dir: str | Path = DEFAULT_DIR, seed: int = 0, cfg: ModelConfig = TINY) -> Path:
    """Random tiny model (seeded) + tokenizer, written atomically to out_dir."""
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
