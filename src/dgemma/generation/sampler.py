"""THE canvas sampler: transformers' DiffusionGemma `generate` (spec §9), over any Backend.

Pure torch. All randomness comes from the caller's torch.Generator, drawn in the reference order
(spec §9.7): per canvas one randint(B,C); per executed step one multinomial(B*C rows) and one
randint(B,C), also on the last step and for frozen rows. Numerics follow spec §11: fp32 temperature
from an int32 step counter, Categorical entropy, bf16 self-conditioning. Knows nothing of
tokenizers, ONNX, TensorRT or Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..core.config import SamplerConfig
from ..core.errors import Cancelled, RequestError
from ..runtime.base import Backend


@dataclass
class StepEvent:
    canvas: int  # 0-based canvas index
    step: int  # 1-based step index within the canvas
    remaining: int  # steps remaining including this one (N..1); the temperature's n
    draft: Tensor  # [B,C] argmax canvas after this step
    mean_entropy: Tensor  # [B] mean per-position entropy of the processed logits
    done: Tensor  # [B] rows that met adaptive stopping


@dataclass
class GenerateResult:
    sequences: Tensor  # [B, L + k*C] prompt followed by committed canvases (pads after EOS)
    prompt_length: int
    canvases: int
    steps_per_canvas: list[int]
    tokens_per_forward: Tensor  # [B] fp32: non-pad new tokens / denoiser passes the row needed
    forward_passes: Tensor  # [B] int

    @property
    def new_tokens(self) -> Tensor:
        return self.sequences[:, self.prompt_length :]


def temperature(cfg: SamplerConfig, remaining: int, device) -> Tensor:
    """T(n) = t_min + (t_max - t_min) * (n / N) in fp32 exactly as torch computes it (spec §11)."""
    n = torch.tensor(remaining, device=device, dtype=torch.int32)
    return cfg.t_min + ((cfg.t_max - cfg.t_min) * (n / cfg.max_denoising_steps))


def entropy(logits: Tensor) -> Tensor:
    """torch.distributions.Categorical(logits=logits).entropy(), without the distribution object."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    return -(torch.clamp(norm, min=torch.finfo(norm.dtype).min) * probs).sum(-1)


def step_stats(raw: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """proc = raw / T; probs = softmax(proc) fp32; argmax; per-position entropy (spec §9)."""
    proc = raw / t
    return proc, torch.softmax(proc, dim=-1, dtype=torch.float32), torch.argmax(proc, dim=-1), entropy(proc)


_COMPILED_STATS = {}


def _stats_fn(device: torch.device):
    """CUDA: one compiled pass over the [B,C,V] logits instead of ~10 (not bit-exact with the eager order,
    which CUDA kernels are not anyway). CPU: the eager reference ops."""
    if device.type != "cuda":
        return step_stats
    if "fn" not in _COMPILED_STATS:
        try:
            _COMPILED_STATS["fn"] = torch.compile(step_stats)
        except Exception:  # noqa: BLE001 - no inductor: eager
            _COMPILED_STATS["fn"] = step_stats
    return _COMPILED_STATS["fn"]


def accept_mask(token_entropy: Tensor, entropy_bound: float) -> Tensor:
    """Entropy-bound acceptance (spec §9.2): accept rank r iff the sum of entropies of ranks < r <= bound."""
    sorted_h, order = torch.sort(token_entropy, dim=-1, descending=False)
    sel = torch.cumsum(sorted_h, dim=-1) - sorted_h <= entropy_bound
    return torch.scatter(torch.zeros_like(sel), -1, order, sel)


def finalize_canvas(seq: Tensor, finished: Tensor, canvas_length: int, eos: Tensor | None,
                    pad: int) -> tuple[Tensor, Tensor]:
    """After a commit: rows with an EOS finish; tokens after the first EOS and canvases of earlier finished rows
    become pad (spec §9.6). Mutates and returns seq."""
    if eos is None:
        return seq, finished
    fin_now = torch.isin(seq[:, -canvas_length:], eos).any(dim=-1)
    prev = finished
    finished = prev | fin_now
    if torch.any(finished):
        seq[prev, -canvas_length:] = pad
        if torch.any(fin_now):
            new = seq[:, -canvas_length:]
            is_eos = torch.isin(new, eos)
            cs = is_eos.cumsum(dim=-1)
            new[(cs > 0) & ~((cs == 1) & is_eos)] = pad
    return seq, finished


class _Stopping:
    """StableAndConfidentStoppingCriteria (spec §9.5); history starts at -1 and resets per canvas."""

    def __init__(self, cfg: SamplerConfig):
        self.k, self.threshold = cfg.stability_threshold, cfg.confidence_threshold
        self.hist: Tensor | None = None

    def __call__(self, argmax: Tensor, proc: Tensor, holes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.k == 0:
            stable = torch.ones(proc.shape[0], device=proc.device, dtype=torch.bool)
        else:
            if self.hist is None:
                self.hist = torch.full((self.k, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.hist == argmax[None]).all(dim=-1).all(dim=0)
            self.hist = torch.roll(self.hist, shifts=-1, dims=0)
            self.hist[-1] = argmax
        mean_h = mean_entropy(proc, holes)
        return stable & (mean_h < self.threshold), mean_h


def mean_entropy(proc: Tensor, holes: Tensor | None) -> Tensor:
    """Mean per-position entropy [B]; with an infill template, over the holes only."""
    h = entropy(proc)
    if holes is None:
        return h.mean(dim=-1)
    return (h * holes).sum(-1) / holes.sum(-1).clamp(min=1)


def check_template(template: Tensor | None, b: int, c: int, v: int, device) -> Tensor | None:
    if template is None:
        return None
    if template.ndim != 2 or template.shape[0] != b or template.shape[1] % c or template.shape[1] == 0:
        raise RequestError(f"infill template must be [batch={b}, k*{c}] (whole canvases) of ids or -1 for holes "
                           f"(got shape {list(template.shape)}).")
    lo, hi = int(template.min()), int(template.max())
    if lo < -1 or hi >= v:
        raise RequestError(f"infill template value {lo if lo < -1 else hi} is invalid: use -1 for a hole or a token "
                           f"id in 0..{v - 1}.")
    return template.to(device=device, dtype=torch.int64)


def check_request(prompt: Tensor, cfg: SamplerConfig, backend: Backend) -> int:
    """Validate a request against the backend's limits; returns the number of canvases."""
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise RequestError(f"prompt must be a [batch, length>=1] tensor of token ids (got shape {list(prompt.shape)}).")
    if prompt.dtype not in (torch.int64, torch.int32):
        raise RequestError(f"prompt ids must be integers (got {prompt.dtype}).")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= backend.vocab_size:
        bad = lo if lo < 0 else hi
        raise RequestError(f"prompt token id {bad} is outside the vocabulary 0..{backend.vocab_size - 1}.")
    n_canvases = math.ceil(cfg.max_new_tokens / backend.canvas_length)
    total = prompt.shape[1] + n_canvases * backend.canvas_length
    if total > backend.max_context:
        raise RequestError(
            f"prompt of {prompt.shape[1]} tokens + {n_canvases} canvas(es) of {backend.canvas_length} = {total} tokens "
            f"exceeds max_context={backend.max_context} (the KV buffers' capacity). Shorten the prompt, lower "
            "max_new_tokens, or raise --max-context."
        )
    return n_canvases


@torch.no_grad()
def generate(backend: Backend, prompt: Tensor, cfg: SamplerConfig, generator: torch.Generator,
             on_step: Callable[[StepEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_canvas: Callable[[int, Tensor], None] | None = None,
             template: Tensor | None = None) -> GenerateResult:
    """Block-diffusion generation, token for token equal to transformers' generate with the same RNG state.

    prompt [B,L] int64 on backend.device. on_step(StepEvent) after every denoising step; on_canvas(i,
    committed [B,C]) after every commit; should_stop() is polled before every step and raises Cancelled.

    template [B, k*C] (infill / inline edit): ids >= 0 are fixed, -1 are holes; canvas i uses columns
    [i*C, (i+1)*C) (canvases past the template are free). Fixed tokens are in the canvas at every step and
    in the committed output (also after an EOS, which pads only holes); acceptance and the confidence stop
    look at the holes only. RNG draws are
    unchanged, so a template of all holes gives exactly the plain result.
    """
    n_canvases = check_request(prompt, cfg, backend)
    device, b = prompt.device, prompt.shape[0]
    c, v = backend.canvas_length, backend.vocab_size
    template = check_template(template, b, c, v, device)
    prompt_len = prompt.shape[1]
    seq = prompt.to(torch.int64)
    eos = None if cfg.ignore_eos or not cfg.eos_token_ids else torch.tensor(cfg.eos_token_ids, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    fwd = torch.zeros(b, dtype=torch.int, device=device)
    stopping = _Stopping(cfg) if cfg.adaptive_stopping else None
    state = backend.new_state(b)
    stats = _stats_fn(torch.device(device))
    enc_ids = seq
    steps_per_canvas: list[int] = []
    for ci in range(n_canvases):
        backend.encode(state, enc_ids)
        canvas = torch.randint(0, v, (b, c), device=device, generator=generator)  # RNG-1
        fixed = holes = tmpl = None
        if template is not None and template.shape[1] > ci * c:
            tmpl = template[:, ci * c : (ci + 1) * c]
            fixed = tmpl >= 0
            holes = (~fixed).float()
            canvas = torch.where(fixed, tmpl, canvas)
        argmax = canvas
        soft: Tensor | None = None
        done = torch.zeros(b, dtype=torch.bool, device=device)
        if stopping is not None:
            stopping.hist = None
        steps = 0
        for remaining in range(cfg.max_denoising_steps, 0, -1):
            if should_stop is not None and should_stop():
                raise Cancelled(f"generation cancelled at canvas {ci + 1}, step {steps + 1}")
            fwd += ~(done | finished)
            t = temperature(cfg, remaining, device)
            raw, next_soft = backend.denoise(state, canvas, soft, t)
            proc, probs, am, h = stats(raw, t)
            samp = torch.multinomial(probs.view(-1, v), num_samples=1, generator=generator).view(b, c)  # RNG-2
            if fixed is not None:  # fixed positions cost nothing in the entropy budget
                h = torch.where(fixed, torch.zeros_like(h), h)
            acc = accept_mask(h, cfg.entropy_bound)
            nxt = torch.where(acc, samp, canvas)
            noise = torch.randint(0, v, (b, c), device=device, generator=generator)  # RNG-3
            nxt = torch.where(~acc, noise, nxt)
            if fixed is not None:
                nxt, am = torch.where(fixed, tmpl, nxt), torch.where(fixed, tmpl, am)
            steps += 1
            if stopping is not None:
                if done.any():  # stopped rows are frozen (spec §9.5)
                    am = torch.where(done[:, None], argmax, am)
                    nxt = torch.where(done[:, None], canvas, nxt)
                    next_soft = torch.where(done[:, None, None], soft, next_soft)
                stop, mean_h = stopping(am, proc, holes)
                done = done | stop
            else:
                mean_h = mean_entropy(proc, holes)
            canvas, argmax, soft = nxt, am, next_soft
            if on_step is not None:
                on_step(StepEvent(ci, steps, remaining, argmax, mean_h, done))
            if torch.all(done):
                break
        steps_per_canvas.append(steps)
        seq = torch.cat([seq, argmax], dim=-1)  # commit the argmax canvas, not the sampled one
        seq, finished = finalize_canvas(seq, finished, c, eos, cfg.pad_token_id)
        if fixed is not None:  # the caller's fixed tokens survive EOS padding too
            seq[:, -c:] = torch.where(fixed, tmpl, seq[:, -c:])
        if on_canvas is not None:
            on_canvas(ci, seq[:, -c:])
        if torch.all(finished):
            break
        enc_ids = seq[:, -c:].clone()
    new = seq[:, prompt_len:]
    valid = (new != cfg.pad_token_id).sum(dim=-1)
    return GenerateResult(seq, prompt_len, len(steps_per_canvas), steps_per_canvas, valid / fwd, fwd)
