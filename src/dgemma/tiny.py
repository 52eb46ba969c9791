"""The tiny default checkpoint: a DiffusionGemma-shaped model small enough for CI, in the real layout.

`write_tiny(dir)` writes config.json, generation_config.json, model.safetensors and a byte-level
tokenizer.json; it is loaded by exactly the same code as the real checkpoint (dgemma.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import TINY, ModelConfig, SamplerConfig
from .model import DiffusionGemma
from .tokens import build_byte_tokenizer

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "build" / "checkpoints" / "tiny"


def tiny_sampler(cfg: ModelConfig = TINY) -> SamplerConfig:
    return SamplerConfig(max_new_tokens=2 * cfg.canvas_length, eos_token_ids=(1, 106, 50))


def write_tiny(out_dir: str | Path = DEFAULT_DIR, seed: int = 0, cfg: ModelConfig = TINY) -> Path:
    """Random tiny model (seeded) + tokenizer, written atomically to out_dir."""
    model = DiffusionGemma.random(cfg, dtype=torch.float32, seed=seed)
    tok = build_byte_tokenizer(cfg.vocab_size)
    return save_checkpoint(model, out_dir, tiny_sampler(cfg), extra_files={"tokenizer.json": tok.to_str().encode()})


def ensure_tiny(path: str | Path = DEFAULT_DIR) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        write_tiny(path)
    return path
