"""The fast-path generate: the canvas loop of spec §9 with the fused LM head + sampler (kernels.fused_sampler) on a
FastBackend, for benchmarks where token equality with transformers is not required (the probe's anchor runs).

Same loop, schedule, acceptance, adaptive stopping, argmax commit and EOS handling as dgemma.generation.sampler,
but the randomness is Gumbel-max over a Philox stream keyed by (seed, row) instead of torch.multinomial / randint on
the caller's generator: the tokens are NOT those of transformers' generate; argmax, entropy and acceptance are equal
given the same logits. The V-sized logits never leave the device; each step (the denoiser and the sampler) is one
CUDA graph (FastBackend.sampler_step), and nothing syncs the host inside it: the adaptive-stopping flag lives on the
device and is read after the step (as the reference's torch.all(done)), and only when adaptive stopping is on.
`generate()` stays the reference path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..core.config import SamplerConfig
from .sampler import GenerateResult, StepEvent, check_request, finalize_canvas, temperature


@torch.no_grad()
def fused_generate(backend, prompt: Tensor, cfg: SamplerConfig, seed: int,
                   on_step: Callable[[StepEvent], None] | None = None,
                   on_canvas: Callable[[int, Tensor], None] | None = None) -> GenerateResult:
    """Block-diffusion generation on `backend` (a runtime.fast.FastBackend whose `head` kernels are on) with the
    fused sampler; row b of the batch draws from the Philox stream of seed + b."""
    n_canvases = check_request(prompt, cfg, backend)
    device, b = prompt.device, prompt.shape[0]
    c = backend.canvas_length
    fs = backend.fused_sampler(cfg)
    state = backend.new_state(b)
    st = backend.sampler_state(state, fs, [seed + i for i in range(b)])
    seq = prompt.to(torch.int64)
    eos = None if cfg.ignore_eos or not cfg.eos_token_ids else torch.tensor(cfg.eos_token_ids, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    fwd = torch.zeros(b, dtype=torch.int, device=device)
    enc_ids = seq
    steps_per_canvas: list[int] = []
    for ci in range(n_canvases):
        backend.encode(state, enc_ids)
        fs.begin_canvas(st)
        steps = 0
        for remaining in range(cfg.max_denoising_steps, 0, -1):
            fwd += ~(st.done | finished)
            out = backend.sampler_step(state, fs, st, temperature(cfg, remaining, device))
            steps += 1
            if on_step is not None:
                on_step(StepEvent(ci, steps, remaining, out.draft, out.mean, out.done))
            if cfg.adaptive_stopping and bool(out.done.all()):
                break
        steps_per_canvas.append(steps)
        seq = torch.cat([seq, st.argmax.clone()], dim=-1)  # commit the argmax canvas
        seq, finished = finalize_canvas(seq, finished, c, eos, cfg.pad_token_id)
        if on_canvas is not None:
            on_canvas(ci, seq[:, -c:])
        if torch.all(finished):
            break
        enc_ids = seq[:, -c:].clone()
    new = seq[:, prompt.shape[1]:]
    valid = (new != cfg.pad_token_id).sum(dim=-1)
    return GenerateResult(seq, prompt.shape[1], len(steps_per_canvas), steps_per_canvas, valid / fwd, fwd)
