"""The tiny model's task: sorting digits. Prompts and answers, encoding a batch for training, and the held-out
evaluation (task accuracy, steps per canvas, tokens per forward) through the real sampler on any backend."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import ModelConfig
from ..core.errors import ConfigError
from ..generation.sampler import generate
from ..model.checkpoint import load_checkpoint
from ..model.tokens import SPECIAL_IDS, Tokenizer, chat_prompt
from ..runtime.torch_backend import TorchBackend

END = "<turn|>"


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


def evaluate(checkpoint: str | Path, task: str = "sort", n: int = 100, seed: int = 1234, steps: int | None = None,
             fixed_steps: bool = False, backend=None, batch: int = 25) -> dict:
    """Task accuracy, steps per canvas and tokens per forward on a fixed held-out set (seeded, disjoint rng)."""
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
