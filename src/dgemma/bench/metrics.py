"""Benchmark arithmetic, pure and tested on synthetic traces: metrics of one request from its timing trace
(`derive`), the median over runs (`summarize`) and the memory roofline of a denoising step (`roofline`).

Metric definitions follow the published anchors (anchors.md §1, §3.2): generation tok/s = committed tokens /
(first denoising step -> last commit), prefill excluded."""

from __future__ import annotations

import statistics

from ..core.config import ModelConfig
from ..core.profiles import Precision
from ..core.stats import percentile


def derive(trace: list[dict], committed_tokens: int, batch: int = 1) -> dict:
    """Metrics of one request from its trace of {"kind", "t0", "t1"} events (seconds).

    kinds: prefill, denoise (backend call), step (denoise start -> sampler done), commit, canvas (t1 only).
    """
    def of(kind):
        return [e for e in trace if e["kind"] == kind]

    prefill, steps, denoise, commits, canvases = of("prefill"), of("step"), of("denoise"), of("commit"), of("canvas")
    t_start = prefill[0]["t0"]
    t_first_step = steps[0]["t0"]
    t_end = canvases[-1]["t1"]
    gen_s = t_end - t_first_step
    ms = lambda evs: [1e3 * (e["t1"] - e["t0"]) for e in evs]  # noqa: E731
    step_ms, den_ms, com_ms = ms(steps), ms(denoise), ms(commits)
    per_canvas, cur = [], 0
    for e in trace:  # steps between canvas events
        if e["kind"] == "step":
            cur += 1
        elif e["kind"] == "canvas":
            per_canvas.append(cur)
            cur = 0
    later = sum(per_canvas[1:])  # steps after the first canvas: the inter-canvas time per step (Triton's view)
    inter = 1e3 * (canvases[-1]["t1"] - canvases[0]["t1"]) / later if len(canvases) > 1 and later else None
    return {
        "committed_tokens": committed_tokens,
        "batch": batch,
        "generation_s": gen_s,
        "e2e_s": t_end - t_start,
        "generation_tok_s": committed_tokens / gen_s,
        "e2e_tok_s": committed_tokens / (t_end - t_start),
        "prefill_ms": 1e3 * (prefill[0]["t1"] - prefill[0]["t0"]),
        "time_to_first_canvas_ms": 1e3 * (canvases[0]["t1"] - t_start),
        "step_ms_p50": percentile(step_ms, 50),
        "step_ms_p99": percentile(step_ms, 99),
        "step_ms_mean": statistics.fmean(step_ms),
        "denoise_ms_p50": percentile(den_ms, 50),
        "denoise_ms_p99": percentile(den_ms, 99),
        "commit_ms_mean": statistics.fmean(com_ms) if com_ms else None,
        "canvases": len(canvases),
        "steps_per_canvas": per_canvas,
        "mean_steps_per_canvas": statistics.fmean(per_canvas),
        "tokens_per_forward": committed_tokens / batch / len(steps),
        "inter_canvas_ms_per_step": inter,
        "step_latencies_ms": [round(x, 4) for x in step_ms],
    }


def roofline(cfg: ModelConfig, precision: Precision, prefix: int, hbm_gbs: float, batch: int = 1,
             lm_head_bytes: float = 2.0) -> dict:
    """Fewest bytes one denoising step must move, and the step floor at the given bandwidth.

    Weights: every linear at the precision; with C*B*top_k >> experts every expert is read (the expected
    fraction touched is reported); embedding read twice at 16 bit (LM head, soft embedding). KV: the
    cached prefix of every layer. Logits: written once and read once in fp32 by the sampler.
    """
    wb = precision.weight_bytes
    h, c, v = cfg.hidden_size, cfg.canvas_length, cfg.vocab_size
    touched = 1 - (1 - cfg.top_k_experts / cfg.num_experts) ** (c * batch)
    experts = attn = dense = 0
    for i in range(cfg.num_hidden_layers):
        hd, kvh = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        attn += h * cfg.num_attention_heads * hd * 2 + h * kvh * hd * (2 if cfg.is_sliding(i) else 1)
        dense += 3 * h * cfg.intermediate_size + h * cfg.num_experts
        experts += cfg.num_experts * 3 * h * cfg.moe_intermediate_size * touched
    dense += 3 * h * cfg.intermediate_size  # self-conditioning MLP
    kv = 0
    for i in range(cfg.num_hidden_layers):
        n = min(prefix, cfg.sliding_cache_len) if cfg.is_sliding(i) else prefix
        kv += 2 * batch * n * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * 2
    parts = {
        "attention_weights": attn * wb,
        "dense_mlp_router_weights": dense * wb,
        "expert_weights": experts * wb,
        "embedding_lm_head_and_soft_embed": 2 * v * h * lm_head_bytes,
        "kv_cache": kv,
        "logits_fp32_write_read": 2 * batch * c * v * 4,
    }
    total = sum(parts.values())
    floor_ms = total / (hbm_gbs * 1e9) * 1e3 if hbm_gbs else float("nan")
    return {
        "bytes": {k: round(x) for k, x in parts.items()},
        "total_gb": total / 1e9,
        "experts_touched_fraction": touched,
        "hbm_gbs": hbm_gbs,
        "step_floor_ms": floor_ms,
        "ceiling_tok_s_at_16_steps": batch * c / (16 * floor_ms / 1e3) if hbm_gbs else float("nan"),
    }


SUMMARY_KEYS = ("generation_tok_s", "e2e_tok_s", "time_to_first_canvas_ms", "step_ms_p50", "step_ms_p99",
                "denoise_ms_p50", "commit_ms_mean", "prefill_ms", "mean_steps_per_canvas", "tokens_per_forward")


def summarize(runs: list[dict]) -> dict:
    """Median over runs of every summary metric; a metric no run observed is None."""
    out = {}
    for k in SUMMARY_KEYS:
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(xs) if xs else None
    return out
