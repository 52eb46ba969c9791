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
    committed: Tensor | None = None  # [B,C] the committed canvas when this step ended the canvas, else None


@dataclass
class GenerateResult:
    sequences: Tensor  # [B, L + k*C] prompt followed by committed canvases (pads after EOS)
    prompt_length: int
    canvases: int
    steps_per_canvas: list[int]
    tokens_per_forward: Tensor  # [B] fp32: non-pad new tokens / denoiser passes the row needed
    forward_passes: Tensor  # [B] int
    finished: Tensor | None = None  # [B] rows that ended on an EOS (not by running out of canvases)
    logprobs: Tensor | None = None  # [B, k*C] fp32: each new token's log-probability (with `logprobs=`)
    top_ids: Tensor | None = None  # [B, k*C, K] int64: the K most likely tokens at each position
    top_logprobs: Tensor | None = None  # [B, k*C, K] fp32: their log-probabilities

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


def stats_for(device: torch.device):
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


class Rng:
    """Where a generation's random draws come from, in the reference order (spec §9.7). One torch.Generator for
    all rows draws exactly as transformers does for a batch; a list of one generator per row draws each row as if
    it were alone (B=1), which is what lets a request's answer stay the same whoever shares its batch."""

    def __init__(self, generators: torch.Generator | list[torch.Generator]):
        self.shared = isinstance(generators, torch.Generator)
        self.generators = generators

    def randint(self, v: int, b: int, c: int, device) -> Tensor:
        if self.shared:
            return torch.randint(0, v, (b, c), device=device, generator=self.generators)
        return torch.cat([torch.randint(0, v, (1, c), device=device, generator=g) for g in self.generators])

    def multinomial(self, probs: Tensor) -> Tensor:
        """probs [B,C,V] fp32 -> one draw per position [B,C]."""
        b, c, v = probs.shape
        if self.shared:
            return torch.multinomial(probs.view(-1, v), num_samples=1, generator=self.generators).view(b, c)
        return torch.cat([torch.multinomial(probs[i], num_samples=1, generator=g).view(1, c)
                          for i, g in enumerate(self.generators)])


def log_probs(proc: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """log_softmax(proc) fp32 at `tokens` [B,C], and (k > 0) the k most likely tokens [B,C,k] with theirs."""
    lp = torch.log_softmax(proc.float(), dim=-1)
    chosen = lp.gather(-1, tokens[..., None]).squeeze(-1)
    if not k:
        return chosen, None, None
    top_lp, top_ids = lp.topk(k, dim=-1)
    return chosen, top_ids, top_lp


class Generation:
    """One block-diffusion generation of B rows sharing a prompt length, advanced one backend call at a time:
    `phase` is "encode" (the prompt, then each committed canvas: `encode_ids()` -> backend.encode -> `encoded()`),
    "denoise" (`denoise_inputs()` -> backend.denoise -> `denoised(raw, next_soft)`) or "done" (`result()`).

    `generate` drives one Generation over one backend state; the serving scheduler drives one per request, the
    backend calls of many requests batched together. The arithmetic is written once, here.

    logprobs: None (off), 0 (the committed tokens' log-probabilities) or K > 0 (also the top K alternatives), each
    under the distribution of the step that fixed the token (the canvas's last step, or the step a row stopped at).
    """

    def __init__(self, prompt: Tensor, cfg: SamplerConfig, rng: Rng, canvas_length: int, vocab_size: int,
                 template: Tensor | None = None, n_canvases: int | None = None, logprobs: int | None = None,
                 stats=None):
        self.cfg, self.rng = cfg, rng
        self.device, self.batch = prompt.device, prompt.shape[0]
        self.c, self.v = canvas_length, vocab_size
        self.template = check_template(template, self.batch, self.c, self.v, self.device)
        self.n_canvases = n_canvases or math.ceil(cfg.max_new_tokens / canvas_length)
        self.prompt_len = prompt.shape[1]
        self.seq = prompt.to(torch.int64)
        self.eos = None if cfg.ignore_eos or not cfg.eos_token_ids else torch.tensor(cfg.eos_token_ids,
                                                                                      device=self.device)
        b = self.batch
        self.finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        self.fwd = torch.zeros(b, dtype=torch.int, device=self.device)
        self.stopping = _Stopping(cfg) if cfg.adaptive_stopping else None
        self.stats = stats or step_stats
        self.logprobs = logprobs
        self.lp_chunks: list[tuple] = []  # per committed canvas: (chosen, top ids, top logprobs)
        self.steps_per_canvas: list[int] = []
        self.ci = 0
        self.phase = "encode"
        self._enc_ids = self.seq

    # -- encode phase ----------------------------------------------------------------------------------------------
    def encode_ids(self) -> Tensor:
        """[B,S]: the prompt, then the last committed canvas."""
        return self._enc_ids

    def encoded(self) -> None:
        """The ids are in the KV state: start canvas `ci` from uniform noise (RNG-1)."""
        b, c = self.batch, self.c
        canvas = self.rng.randint(self.v, b, c, self.device)  # RNG-1
        self.fixed = self.holes = self.tmpl = None
        if self.template is not None and self.template.shape[1] > self.ci * c:
            self.tmpl = self.template[:, self.ci * c : (self.ci + 1) * c]
            self.fixed = self.tmpl >= 0
            self.holes = (~self.fixed).float()
            canvas = torch.where(self.fixed, self.tmpl, canvas)
        self.canvas, self.argmax, self.soft = canvas, canvas, None
        self.done = torch.zeros(b, dtype=torch.bool, device=self.device)
        if self.stopping is not None:
            self.stopping.hist = None
        self.steps, self.remaining = 0, self.cfg.max_denoising_steps
        self.lp = self.top_ids = self.top_lp = None
        self.phase = "denoise"

    # -- denoise phase ---------------------------------------------------------------------------------------------
    def temperature(self) -> Tensor:
        return temperature(self.cfg, self.remaining, self.device)

    def denoise_inputs(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(canvas [B,C], previous soft embeddings [B,C,H] or None on a canvas's first step, 0-d fp32 T)."""
        return self.canvas, self.soft, self.temperature()

    def denoised(self, raw: Tensor, next_soft: Tensor) -> StepEvent:
        """One sampler step on the backend's raw logits [B,C,V] (RNG-2, RNG-3); commits the canvas when every row
        is done or the step budget is spent (the event's `committed`)."""
        cfg, b, c = self.cfg, self.batch, self.c
        done, fixed, tmpl, canvas = self.done, self.fixed, self.tmpl, self.canvas
        self.fwd += ~(done | self.finished)
        t = self.temperature()
        proc, probs, am, h = self.stats(raw, t)
        samp = self.rng.multinomial(probs)  # RNG-2
        if fixed is not None:  # fixed positions cost nothing in the entropy budget
            h = torch.where(fixed, torch.zeros_like(h), h)
        acc = accept_mask(h, cfg.entropy_bound)
        nxt = torch.where(acc, samp, canvas)
        noise = self.rng.randint(self.v, b, c, self.device)  # RNG-3
        nxt = torch.where(~acc, noise, nxt)
        if fixed is not None:
            nxt, am = torch.where(fixed, tmpl, nxt), torch.where(fixed, tmpl, am)
        self.steps += 1
        was_done = done
        if self.stopping is not None:
            if done.any():  # stopped rows are frozen (spec §9.5)
                am = torch.where(done[:, None], self.argmax, am)
                nxt = torch.where(done[:, None], canvas, nxt)
                next_soft = torch.where(done[:, None, None], self.soft, next_soft)
            stop, mean_h = self.stopping(am, proc, self.holes)
            done = done | stop
        else:
            mean_h = mean_entropy(proc, self.holes)
        if self.logprobs is not None:  # rows whose tokens are fixed by this step: the last step, or the stop step
            final = ~was_done & (done | (self.remaining == 1))
            if final.any():
                lp, ti, tl = log_probs(proc, am, self.logprobs)
                self.lp = lp if self.lp is None else torch.where(final[:, None], lp, self.lp)
                if ti is not None:
                    keep = final[:, None, None]
                    self.top_ids = ti if self.top_ids is None else torch.where(keep, ti, self.top_ids)
                    self.top_lp = tl if self.top_lp is None else torch.where(keep, tl, self.top_lp)
        self.canvas, self.argmax, self.soft, self.done = nxt, am, next_soft, done
        ev = StepEvent(self.ci, self.steps, self.remaining, am, mean_h, done)
        self.remaining -= 1
        if self.remaining == 0 or bool(torch.all(done)):
            ev.committed = self._commit()
        return ev

    def _commit(self) -> Tensor:
        c = self.c
        self.steps_per_canvas.append(self.steps)
        self.seq = torch.cat([self.seq, self.argmax], dim=-1)  # commit the argmax canvas, not the sampled one
        self.seq, self.finished = finalize_canvas(self.seq, self.finished, c, self.eos, self.cfg.pad_token_id)
        if self.fixed is not None:  # the caller's fixed tokens survive EOS padding too
            self.seq[:, -c:] = torch.where(self.fixed, self.tmpl, self.seq[:, -c:])
        if self.logprobs is not None:
            self.lp_chunks.append((self.lp, self.top_ids, self.top_lp))
        self.ci += 1
        if bool(torch.all(self.finished)) or self.ci == self.n_canvases:
            self.phase = "done"
        else:
            self._enc_ids = self.seq[:, -c:].clone()
            self.phase = "encode"
        return self.seq[:, -c:]

    def stop(self) -> None:
        """End after the canvas just committed (a stop sequence was found): no further canvas."""
        self.phase = "done"

    def result(self) -> GenerateResult:
        new = self.seq[:, self.prompt_len :]
        valid = (new != self.cfg.pad_token_id).sum(dim=-1)
        res = GenerateResult(self.seq, self.prompt_len, len(self.steps_per_canvas), self.steps_per_canvas,
                             valid / self.fwd, self.fwd, self.finished)
        if self.logprobs is not None and self.lp_chunks:
            res.logprobs = torch.cat([x[0] for x in self.lp_chunks], dim=-1)
            if self.logprobs:
                res.top_ids = torch.cat([x[1] for x in self.lp_chunks], dim=1)
                res.top_logprobs = torch.cat([x[2] for x in self.lp_chunks], dim=1)
        return res


@torch.no_grad()
def generate(backend: Backend, prompt: Tensor, cfg: SamplerConfig, generator: torch.Generator,
             on_step: Callable[[StepEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_canvas: Callable[[int, Tensor], None] | None = None,
             template: Tensor | None = None, logprobs: int | None = None) -> GenerateResult:
    """Block-diffusion generation, token for token equal to transformers' generate with the same RNG state.

    prompt [B,L] int64 on backend.device. on_step(StepEvent) after every denoising step; on_canvas(i,
    committed [B,C]) after every commit; should_stop() is polled before every step and raises Cancelled.

    template [B, k*C] (infill / inline edit): ids >= 0 are fixed, -1 are holes; canvas i uses columns
    [i*C, (i+1)*C) (canvases past the template are free). Fixed tokens are in the canvas at every step and
    in the committed output (also after an EOS, which pads only holes); acceptance and the confidence stop
    look at the holes only. RNG draws are unchanged, so a template of all holes gives exactly the plain result.
    logprobs: see Generation.
    """
    n_canvases = check_request(prompt, cfg, backend)
    gen = Generation(prompt, cfg, Rng(generator), backend.canvas_length, backend.vocab_size, template, n_canvases,
                     logprobs, stats_for(torch.device(prompt.device)))
    state = backend.new_state(gen.batch)
    while gen.phase != "done":
        if gen.phase == "encode":
            backend.encode(state, gen.encode_ids())
            gen.encoded()
            continue
        if should_stop is not None and should_stop():
            raise Cancelled(f"generation cancelled at canvas {gen.ci + 1}, step {gen.steps + 1}")
        raw, next_soft = backend.denoise(state, *gen.denoise_inputs())
        ev = gen.denoised(raw, next_soft)
        if on_step is not None:
            on_step(ev)
        if ev.committed is not None and on_canvas is not None:
            on_canvas(ev.canvas, ev.committed)
    return gen.result()
