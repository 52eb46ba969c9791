"""Calibration data and the calibration forward loop of the quantize stage: prompts from JSONL, batched by length,
driven through the real sampler so the encoder sees prompts and committed canvases and the denoiser sees canvases at
every step from noise to clean, with self-conditioning as in generation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..core.errors import ArtifactError
from ..core.layout import CALIB_PROMPTS
from ..generation.sampler import generate
from ..runtime.torch_backend import TorchBackend

CALIB_STEPS = 8  # fixed denoising steps per canvas during calibration: canvases from noise to clean


# -- calibration ---------------------------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[str]:
    """JSONL with one {"text": ...} per line -> texts. Missing, empty or malformed -> ArtifactError."""
    path = Path(path)
    fix = f" The shipped set is {CALIB_PROMPTS}; pass --calib FILE (JSONL, one {{\"text\": ...}} a line)."
    if not path.is_file():
        raise ArtifactError(f"calibration file {path} not found.{fix}")
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"] if isinstance(row, dict) else None
        except (json.JSONDecodeError, KeyError):
            text = None
        if not isinstance(text, str) or not text:
            raise ArtifactError(f"{path}:{n}: expected a JSON object with a non-empty string 'text'.{fix}")
        texts.append(text)
    if not texts:
        raise ArtifactError(f"calibration file {path} holds no prompts.{fix}")
    return texts


def prompt_batches(tok, texts: list[str], max_batch: int = 16) -> list[Tensor]:
    """Chat-templated ids grouped by length (the sampler takes one prompt length per batch) -> [B,L] int64."""
    by_len: dict[int, list[list[int]]] = {}
    for t in texts:
        ids = tok.encode_chat(t)
        by_len.setdefault(len(ids), []).append(ids)
    out = []
    for _, rows in sorted(by_len.items()):
        out += [torch.tensor(rows[i : i + max_batch]) for i in range(0, len(rows), max_batch)]
    return out


def calib_sampler(sampler, steps: int = CALIB_STEPS):
    return sampler.replace(max_denoising_steps=steps, adaptive_stopping=False)


def forward_loop(batches: list[Tensor], sampler, seed: int = 0, desc: str = "calibrate"):
    """ModelOpt forward_loop: the real sampler over the prompts, so `encode` sees prompts (and committed canvases)
    and `denoise` sees canvases at every step from noise to clean, with self-conditioning as in generation."""
    from tqdm import tqdm

    def loop(model):
        be = TorchBackend(model, max_context=max(b.shape[1] for b in batches) + sampler.max_new_tokens + 32)
        for i, b in enumerate(tqdm(batches, desc=desc, file=sys.stderr, disable=None)):
            generate(be, b.to(be.device), sampler, torch.Generator(device=be.device).manual_seed(seed + i))

    return loop
