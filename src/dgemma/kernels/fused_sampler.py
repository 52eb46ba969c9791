"""Per-step launcher of the fused LM head + sampler: what the fast CUDA backend calls after the last layer.

    fs = FusedSampler(HeadWeights.build(model.embed_tokens.weight), canvas_length=256, softcap=30.0,
                      entropy_bound=0.1, stability_threshold=1, confidence_threshold=0.005)
    st = fs.new_state(batch, seeds)              # device buffers, allocated once per batch size
    fs.begin_canvas(st)                          # noise canvas, argmax = canvas, history -1, done 0, soft 0
    for remaining in N..1:
        hidden = backbone(st.canvas, st.soft)    # the denoiser, reading the soft embedding the last step left
        out = fs.step(st, final_norm(hidden), temperature(cfg, remaining))   # no host sync inside
        (stream out.argmax as the draft; read out.done when convenient)

One step launches: pass 1 (head GEMM + partials, head_sampler), pass 2 (reduction), the probability
normalisation and the soft-embedding GEMM + finish (soft_embed), the canvas step (canvas_step): 6 kernels, all
shapes static, every scalar that changes per step (temperature, RNG counter, done) read from device memory, so the
step can be captured in one CUDA graph. Full size, B = 1, bf16 E: E is read twice (head and soft GEMM, 2.95 GB as
today); everything else moves ~0.66 GB: bf16(proc) written once, normalised in place (read + write), read by the
soft GEMM (4 x 134 MB), partials 34 MB written and read twice, soft-GEMM slices 9 MB. Today's tail (runtime.fast +
sampler.step_stats/multinomial/mean_entropy) makes ~8 fp32 passes of 268 MB in the head and soft embedding and
~10 more in the sampler, plus a multinomial with host syncs and a `torch.all(done)` sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .canvas_step import init_canvas, step_update
from .head_sampler import Partials, head_partials, logits_partials, pick, quant_rows, reduce_partials
from .soft_embed import pick as pick_soft
from .soft_embed import soft_embed


@dataclass
class HeadWeights:
    """The tied embedding as the two GEMMs read it: bf16 E [V, H] always; optional e4m3 copies with fp32 scales
    (runtime.fast's fp8_lm_head: per-vocabulary-row scales for the head, per-hidden-channel for the soft GEMM)."""

    embed: Tensor
    head8: Tensor | None = None  # [V, H] e4m3
    head8_scale: Tensor | None = None  # [V]
    soft8: Tensor | None = None  # [H, V] e4m3 (E^T)
    soft8_scale: Tensor | None = None  # [H]

    @classmethod
    def build(cls, embed: Tensor, fp8_head: bool = False, fp8_soft: bool = False, chunk: int = 16384) -> "HeadWeights":
        def q(w):  # chunks bound the fp32 temporary of the quantisation
            parts = [quant_rows(w[i:i + chunk]) for i in range(0, w.shape[0], chunk)]
            return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]).reshape(-1).contiguous()
        w = cls(embed.contiguous())
        if fp8_head:
            w.head8, w.head8_scale = q(embed)
        if fp8_soft:
            w.soft8, w.soft8_scale = q(embed.t().contiguous())
        return w


@dataclass
class SamplerState:
    """Device state of one batch (static addresses: CUDA-graph friendly)."""

    canvas: Tensor  # int64 [B, C]: the canvas the next denoise reads
    argmax: Tensor  # int64 [B, C]: the draft / what a commit takes
    hist: Tensor  # int64 [K, B, C]: the last K argmax canvases (-1 at a canvas start)
    done: Tensor  # bool [B]: adaptive stop, sticky within a canvas
    rng: Tensor  # int64 [B, 2]: (seed, step counter) per row
    soft: Tensor  # bf16 [B, C, H]: the next self-conditioning soft embedding (0 on a canvas's first step)
    accept: Tensor  # bool [B, C]: accepted positions of the last step
    mean: Tensor  # fp32 [B]: mean entropy of the last step
    parts: Partials
    soft_part: Tensor  # fp32 [SPLIT, B*C, H]
    probs8: Tensor | None
    probs8_scale: Tensor | None
    template: Tensor | None = None  # int64 [B, C]: fixed ids >= 0, holes -1 (infill)


@dataclass
class StepResult:
    """Views of one step's outputs (overwritten by the next step)."""

    argmax: Tensor  # int64 [B, C]: argmax of proc (before freezing/template), token for token torch's argmax
    sample: Tensor  # int64 [B, C]: the exponential-race sample
    entropy: Tensor  # fp32 [B, C]: Categorical(logits=proc).entropy()
    lp_argmax: Tensor  # fp32 [B, C]: log p of the argmax token
    lp_sample: Tensor  # fp32 [B, C]: log p of the sampled token
    accept: Tensor  # bool [B, C]
    mean: Tensor  # fp32 [B]
    done: Tensor  # bool [B]
    draft: Tensor  # int64 [B, C]: the argmax canvas after freezing/template (StepEvent.draft)


class FusedSampler:
    def __init__(self, weights: HeadWeights, *, canvas_length: int, softcap: float, entropy_bound: float = 0.1,
                 stability_threshold: int = 1, confidence_threshold: float = 0.005, adaptive: bool = True):
        self.w, self.c, self.softcap = weights, canvas_length, float(softcap)
        self.v, self.h = weights.embed.shape
        assert self.v % 16 == 0 and self.h % 16 == 0, "vocabulary and hidden size must be multiples of 16"
        self.bound, self.k, self.threshold = entropy_bound, stability_threshold, confidence_threshold
        self.adaptive = adaptive

    @classmethod
    def from_configs(cls, weights: HeadWeights, model_cfg, sampler_cfg) -> "FusedSampler":
        """From a ModelConfig-like (final_logit_softcapping, canvas_length) and a SamplerConfig-like object."""
        return cls(weights, canvas_length=model_cfg.canvas_length, softcap=model_cfg.final_logit_softcapping,
                   entropy_bound=sampler_cfg.entropy_bound, stability_threshold=sampler_cfg.stability_threshold,
                   confidence_threshold=sampler_cfg.confidence_threshold, adaptive=sampler_cfg.adaptive_stopping)

    def new_state(self, batch: int, seeds) -> SamplerState:
        dev, c, m = self.w.embed.device, self.c, batch * self.c
        assert m * self.v < 2**31, "rows x vocabulary must stay below 2^31 (int32 offsets in the epilogue)"
        i64 = dict(dtype=torch.int64, device=dev)
        rng = torch.zeros(batch, 2, **i64)
        rng[:, 0] = torch.as_tensor(seeds, dtype=torch.int64)
        block_n = pick("head_partials_fp8" if self.w.head8 is not None else "head_partials", m, dev).block_n
        split = pick_soft("soft_embed_fp8" if self.w.soft8 is not None else "soft_embed", m, dev).split_k
        fp8s = self.w.soft8 is not None
        return SamplerState(
            canvas=torch.zeros(batch, c, **i64), argmax=torch.zeros(batch, c, **i64),
            hist=torch.full((self.k, batch, c), -1, **i64), done=torch.zeros(batch, dtype=torch.bool, device=dev),
            rng=rng, soft=torch.zeros(batch, c, self.h, dtype=torch.bfloat16, device=dev),
            accept=torch.zeros(batch, c, dtype=torch.bool, device=dev), mean=torch.zeros(batch, device=dev),
            parts=Partials.new(m, self.v, block_n, dev),
            soft_part=torch.empty(split, m, self.h, dtype=torch.float32, device=dev),
            probs8=torch.empty(m, self.v, dtype=torch.float8_e4m3fn, device=dev) if fp8s else None,
            probs8_scale=torch.empty(m, dtype=torch.float32, device=dev) if fp8s else None)

    def begin_canvas(self, st: SamplerState, template: Tensor | None = None) -> None:
        """Noise canvas (Philox INIT stream; template ids where fixed), argmax = canvas, history -1, done 0, soft 0."""
        st.template = template.contiguous() if template is not None else None
        init_canvas(st.canvas, st.argmax, st.rng, vocab=self.v, template=st.template)
        st.hist.fill_(-1)
        st.done.zero_()
        st.soft.zero_()

    def step(self, st: SamplerState, hidden: Tensor, temperature: Tensor, debug: Tensor | None = None) -> StepResult:
        """hidden: final-normed hidden states [B, C, H] bf16; temperature: fp32 device scalar or [B]."""
        m = hidden.shape[0] * hidden.shape[1]
        w = self.w
        if w.head8 is not None:
            head_partials(hidden.reshape(m, self.h), w.head8, temperature, st.rng, self.c, st.parts,
                          softcap=self.softcap, weight_scale=w.head8_scale, debug=debug)
        else:
            head_partials(hidden.reshape(m, self.h), w.embed, temperature, st.rng, self.c, st.parts,
                          softcap=self.softcap, debug=debug)
        return self._rest(st)

    def step_from_logits(self, st: SamplerState, raw: Tensor, temperature: Tensor,
                         debug: Tensor | None = None) -> StepResult:
        """The same step from raw (softcapped) fp32 logits [B, C, V] (backends that return logits)."""
        logits_partials(raw.reshape(-1, self.v), temperature, st.rng, self.c, st.parts, debug=debug)
        return self._rest(st)

    def _rest(self, st: SamplerState) -> StepResult:
        p, (b, c) = st.parts, st.canvas.shape
        reduce_partials(p)
        w = self.w
        if w.soft8 is not None:
            soft_embed(p.xb, p.stats, w.soft8, st.soft.view(b * c, self.h), st.done, c, weight_scale=w.soft8_scale,
                       probs8=st.probs8, probs8_scale=st.probs8_scale, part=st.soft_part)
        else:
            soft_embed(p.xb, p.stats, w.embed, st.soft.view(b * c, self.h), st.done, c, part=st.soft_part)
        step_update(p.entropy, p.sample, p.argmax, st.canvas, st.argmax, st.hist, st.done, st.rng, st.accept,
                    st.mean, vocab=self.v, entropy_bound=self.bound, confidence_threshold=self.threshold,
                    adaptive=self.adaptive, template=st.template)
        return StepResult(p.argmax.view(b, c), p.sample.view(b, c), p.entropy.view(b, c), p.lp_argmax.view(b, c),
                          p.lp_sample.view(b, c), st.accept, st.mean, st.done, st.argmax)


__all__ = ["FusedSampler", "HeadWeights", "SamplerState", "StepResult"]
