"""The tiny trained default: a DiffusionGemma-shaped model trained on CPU to sort digits, and its evaluation.

Objective (matches how the sampler uses the model): the prompt is encoded causally into the KV cache;
each clean canvas (answer, <turn|>, pads) is corrupted by replacing every token with a uniform random
token with probability t ~ U(0, 1); cross-entropy on every canvas position against the clean canvas.
Half of the batches condition on the model's own previous prediction (self-conditioning), as the
sampler does from step 2 on. Deterministic for a given seed. Data is generated here; no downloads.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .config import FULL, SLIDING, ModelConfig, SamplerConfig
from .model import DiffusionGemma
from .tokens import SPECIAL_IDS, Tokenizer, build_byte_tokenizer, chat_prompt

END = "<turn|>"
# Both passes, sliding and full layers, MoE, self-conditioning; the prompt (~45 tokens) exceeds the window.
TRAINED_TINY = ModelConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
    num_experts=8, top_k_experts=2, sliding_window=24, layer_types=(SLIDING, SLIDING, FULL),
    max_position_embeddings=4096, canvas_length=32, eos_token_ids=(1, 106), dtype="float32",
)


@dataclass(frozen=True)
class SortTask:
    """Sort n digits: prompt 'sort: 3 1 4 ...', answer '1 3 4 ...'. Exact, automatic check."""

    n: int = 10
    name: str = "sort"

    def example(self, rng: random.Random) -> tuple[str, str]:
        digits = [rng.randrange(10) for _ in range(self.n)]
        return f"sort: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))

    def expected(self, prompt: str) -> str:
        return " ".join(sorted(prompt.split(":", 1)[1].split()))

    def check(self, prompt: str, answer: str) -> bool:
        return answer.strip() == self.expected(prompt)


TASKS = {"sort": SortTask()}


def get_task(name: str):
    from .errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid: {', '.join(TASKS)}.")
    return TASKS[name]


def encode_batch(tok: Tokenizer, cfg: ModelConfig, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> prompt ids [B,L] (chat template), clean canvases [B,C] (answer, <turn|>, pad...)."""
    prompts = [tok.encode(chat_prompt(p)) for p, _ in pairs]
    assert len({len(p) for p in prompts}) == 1, "the sort task has fixed-length prompts"
    canvases = []
    for _, a in pairs:
        ids = tok.encode(a + END)[: cfg.canvas_length]
        canvases.append(ids + [cfg.pad_token_id] * (cfg.canvas_length - len(ids)))
    return torch.tensor(prompts), torch.tensor(canvases)


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
    import json

    tail = losses[-50:]
    return (json.dumps({"task": task, "seed": seed, "steps": steps, "final_loss": sum(tail) / len(tail),
                        "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n").encode()


def evaluate(checkpoint: str | Path, task: str = "sort", n: int = 100, seed: int = 1234, steps: int | None = None,
             fixed_steps: bool = False, backend=None, batch: int = 25) -> dict:
    """Task accuracy, steps per canvas and tokens per forward on a fixed held-out set (seeded, disjoint rng)."""
    from .runtime.torch_backend import TorchBackend
    from .sampler import generate

    t = get_task(task)
    ck = load_checkpoint(checkpoint)
    tok = Tokenizer(checkpoint)
    be = backend or TorchBackend(ck.model, max_context=256)
    sampler = ck.sampler
    if steps is not None:
        sampler = sampler.replace(max_denoising_steps=steps)
    if fixed_steps:
        sampler = sampler.replace(adaptive_stopping=False)
    rng = random.Random(seed)
    pairs = [t.example(rng) for _ in range(n)]
    correct, spc, tpf = 0, [], []
    for i in range(0, n, batch):
        chunk = pairs[i : i + batch]
        prompt, _ = encode_batch(tok, ck.config, chunk)
        res = generate(be, prompt.to(be.device), sampler, torch.Generator().manual_seed(seed + i))
        for (p, _), row in zip(chunk, res.new_tokens.tolist()):
            text = tok.decode(row[: _first_end(row)], skip_special_tokens=True)
            correct += t.check(p, text)
        spc += res.steps_per_canvas
        tpf += res.tokens_per_forward.tolist()
    return {"task": task, "n": n, "accuracy": correct / n, "mean_steps_per_canvas": sum(spc) / len(spc),
            "tokens_per_forward": sum(tpf) / len(tpf), "max_denoising_steps": sampler.max_denoising_steps,
            "adaptive": sampler.adaptive_stopping}


def _first_end(row: list[int]) -> int:
    ends = {SPECIAL_IDS["<eos>"], SPECIAL_IDS["<turn|>"], SPECIAL_IDS["<|tool_response>"], 0}
    for i, x in enumerate(row):
        if x in ends:
            return i
    return len(row)
