"""The tiny trained default: a DiffusionGemma-shaped model trained on CPU to sort digits, and its evaluation.

Objective (matches how the sampler uses the model): the prompt is encoded causally into the KV cache;
each clean canvas (answer, <turn|>, pads) is corrupted by replacing every token with a uniform random
token with probability t ~ U(0, 1); cross-entropy on every canvas position against the clean canvas.
Half of the batches condition on the model's own previous prediction (self-conditioning), as the
sampler does from step 2 on. Deterministic for a given seed. Data is generated here; no downloads.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.config import FULL, SLIDING, ModelConfig, SamplerConfig
from ..model.checkpoint import save_checkpoint
from ..model.modeling import DiffusionGemma
from ..model.tokens import Tokenizer, build_byte_tokenizer
from .task import encode_batch, get_task
# Both passes, sliding and full layers, MoE, self-conditioning; the prompt (~45 tokens) exceeds the window.
TRAINED_TINY = ModelConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
    num_experts=8, top_k_experts=2, sliding_window=24, layer_types=(SLIDING, SLIDING, FULL),
    max_position_embeddings=4096, canvas_length=32, eos_token_ids=(1, 106), dtype="float32",
)


def denoise_train(model: DiffusionGemma, prompt: torch.Tensor, canvas: torch.Tensor,
                  soft: torch.Tensor | None) -> torch.Tensor:
    """Differentiable encode + denoise -> canvas logits [B,C,V] fp32."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + model.cfg.canvas_length)
    model.encode(prompt, cache)
    return model.denoise(canvas, soft, cache)


def train_tiny(*args, **kwargs) -> dict:
    """Train and write a checkpoint (real layout, with tokenizer). Returns {'losses', 'seconds', 'steps'}."""
    with torch.enable_grad():
        return _train(*args, **kwargs)


def _train(out_dir: str | Path, steps: int = 1200, batch: int = 64, lr: float = 3e-3, seed: int = 0,
               task: str = "sort", cfg: ModelConfig = TRAINED_TINY, log_every: int = 50,
               time_budget_s: float | None = None) -> dict:
    t = get_task(task)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok_model = build_byte_tokenizer(cfg.vocab_size)
    tok = Tokenizer.__new__(Tokenizer)
    tok.tok, tok.path = tok_model, None
    model = DiffusionGemma.random(cfg, dtype=torch.float32, seed=seed).train()
    model.set_experts_impl("dense")  # exact, and backward-friendly on CPU at this size
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    losses, t0, done = [], time.perf_counter(), 0
    for step in range(steps):
        prompt, clean = encode_batch(tok, cfg, [t.example(rng) for _ in range(batch)])
        noise_level = torch.rand(batch, 1, generator=g)
        noisy = torch.where(torch.rand(clean.shape, generator=g) < noise_level,
                            torch.randint(0, cfg.vocab_size, clean.shape, generator=g), clean)
        soft = None
        if step % 2 == 1:  # self-conditioning from the model's own first pass, as at sampling step >= 2
            with torch.no_grad():
                first = denoise_train(model, prompt, noisy, None)
                temp = 0.4 + 0.4 * torch.rand(batch, 1, 1, generator=g)
                soft = model.soft_embed(first / temp)
        logits = denoise_train(model, prompt, noisy, soft)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), clean.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step + 1
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
        if time_budget_s and time.perf_counter() - t0 > time_budget_s:
            break
    model.set_experts_impl("grouped")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sampler = SamplerConfig(max_new_tokens=cfg.canvas_length, eos_token_ids=(1, 106, 50))
    if out_dir is not None:
        save_checkpoint(model, out_dir, sampler, extra_files={"tokenizer.json": tok_model.to_str().encode(),
                                                              "TRAINING.json": _training_note(task, seed, done,
                                                                                              losses, t0)})
    return {"losses": losses, "seconds": time.perf_counter() - t0, "steps": done, "model": model}


def _training_note(task, seed, steps, losses, t0) -> bytes:
    tail = losses[-50:]
    return (json.dumps({"task": task, "seed": seed, "steps": steps, "final_loss": sum(tail) / len(tail),
                        "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n").encode()


