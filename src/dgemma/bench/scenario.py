"""Benchmark scenarios: bench/scenarios/*.toml (package data, or a path) -> `Scenario`, clamped to a GPU profile
(the `cpu` profile runs every scenario in a reduced form on the tiny model)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.config import ModelConfig, SamplerConfig
from ..core.errors import ConfigError
from ..core.layout import SCENARIOS
from ..core.profiles import GpuProfile


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    batch: int = 1
    prompt_tokens: int = 1024
    max_new_tokens: int = 1024
    steps: int = 48
    adaptive: bool = True
    ignore_eos: bool = False
    repeats: int = 1
    warmup: int = 1
    ar_baseline: bool = False
    ar_tokens: int = 128
    batches: tuple[int, ...] = ()  # concurrency sweep: batch sizes in-process, concurrent requests through Triton
    rounds: int = 2  # Triton sweep: each concurrency level sends level x rounds requests
    prompt_sweep: tuple[int, ...] = ()  # long-context sweep

    @classmethod
    def load(cls, name_or_path: str) -> "Scenario":
        p = Path(name_or_path)
        if not p.suffix:
            p = SCENARIOS / f"{name_or_path}.toml"
        if not p.exists():
            known = ", ".join(sorted(x.stem for x in SCENARIOS.glob("*.toml")))
            raise ConfigError(f"scenario {name_or_path!r} not found ({p}); known: {known}.")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e}).") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}.")
        for k in ("batches", "prompt_sweep"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)

    def fit(self, gpu: GpuProfile, cfg: ModelConfig, served: bool = False) -> "Scenario":
        """Clamp to the profile (the `cpu` profile runs every scenario in a reduced form on the tiny model).

        In-process batches stop at GpuProfile.max_batch (KV buffers, engine profile). Served (Triton), the levels
        are concurrent requests and go to 4 x max_batch: past max_batch requests queue, so the top levels show
        where throughput saturates and latency starts to grow."""
        prompt = min(self.prompt_tokens, gpu.max_prompt)
        room = gpu.max_context - prompt
        new = max(cfg.canvas_length, min(self.max_new_tokens, (room // cfg.canvas_length) * cfg.canvas_length))
        limit = 4 * gpu.max_batch if served else gpu.max_batch
        kw = dict(prompt_tokens=prompt, max_new_tokens=new,
                  batches=tuple(b for b in self.batches if b <= limit),
                  prompt_sweep=tuple(p for p in self.prompt_sweep if p + cfg.canvas_length <= gpu.max_context))
        if gpu.sm == 0 and self.prompt_sweep:  # CPU: the same sweep shape, scaled to the profile's prompt limit
            kw["prompt_sweep"] = (gpu.max_prompt // 4, gpu.max_prompt // 2, gpu.max_prompt)
        if gpu.sm == 0:  # CPU: seconds, not minutes
            kw.update(repeats=1, warmup=0, ar_tokens=min(self.ar_tokens, 8), steps=min(self.steps, 8),
                      rounds=min(self.rounds, 2),
                      batches=kw["batches"] if served else tuple(b for b in kw["batches"] if b <= 2)[:2])
        return replace(self, **kw)

    def sampler(self, base: SamplerConfig) -> SamplerConfig:
        return base.replace(max_new_tokens=self.max_new_tokens, max_denoising_steps=self.steps,
                            adaptive_stopping=self.adaptive, ignore_eos=self.ignore_eos)
