"""THE IO contract of the two graphs, `encoder` and `denoiser`: tensor names, dtypes, symbolic dims, shape profiles.

Owns `TensorSpec` lists derived from a ModelConfig (and the weight dtype of the export precision) and the
min/opt/max optimisation-profile shapes derived from a GpuProfile. Export, the ONNX Runtime backend, the engine
builder and the tests read names and dims from here and nowhere else. Knows nothing of torch, ONNX or TensorRT.

Symbolic dims (each distinct length has its own name, spec §14 risk 9): `batch`, `seq` (encoder tokens),
`past_full` (cached tokens of full layers, P), `past_sliding` (cached tokens of sliding layers, min(P, W-1)),
`present_full` (P+S) and `present_sliding` (min(P+S, W-1)). The canvas length is static.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .config import ModelConfig
from .errors import ConfigError

ENCODER, DENOISER = "encoder", "denoiser"
GRAPHS = (ENCODER, DENOISER)
BATCH, SEQ = "batch", "seq"
PAST_FULL, PAST_SLIDING = "past_full", "past_sliding"
PRESENT_FULL, PRESENT_SLIDING = "present_full", "present_sliding"
CONTRACT_VERSION = 1

# export precision -> dtype of weights, KV and sc_embeds ("fp32" is the CPU/ONNX Runtime reference form)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16", "nvfp4": "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch-style name: int64, float32, bfloat16
    dims: tuple[int | str, ...]  # int = static, str = symbolic dim name


def past_key(i: int) -> str:
    return f"past_key_{i}"


def past_value(i: int) -> str:
    return f"past_value_{i}"


def present_key(i: int) -> str:
    return f"present_key_{i}"


def present_value(i: int) -> str:
    return f"present_value_{i}"


def kv_dtype(precision: str) -> str:
    if precision not in PRECISION_DTYPES:
        raise ConfigError(f"unknown export precision {precision!r}; valid: {', '.join(PRECISION_DTYPES)}.")
    return PRECISION_DTYPES[precision]


def _kv(cfg: ModelConfig, dtype: str, key, value, sliding_len: str, full_len: str) -> list[TensorSpec]:
    """Per-layer K/V specs [B, kvh_i, len, hd_i]; the length dim is symbolic and distinct per layer kind."""
    out = []
    for i in range(cfg.num_hidden_layers):
        dims = (BATCH, cfg.layer_kv_heads(i), sliding_len if cfg.is_sliding(i) else full_len, cfg.layer_head_dim(i))
        out += [TensorSpec(key(i), dtype, dims), TensorSpec(value(i), dtype, dims)]
    return out


def _past(cfg: ModelConfig, dtype: str) -> list[TensorSpec]:
    return _kv(cfg, dtype, past_key, past_value, PAST_SLIDING, PAST_FULL)


def _present(cfg: ModelConfig, dtype: str) -> list[TensorSpec]:
    return _kv(cfg, dtype, present_key, present_value, PRESENT_SLIDING, PRESENT_FULL)


def encoder_inputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    return [TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("position_ids", "int64", (BATCH, SEQ)),
            *_past(cfg, kv_dtype(precision))]


def encoder_outputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    return _present(cfg, kv_dtype(precision))


def denoiser_inputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    c, h = cfg.canvas_length, cfg.hidden_size
    return [TensorSpec("canvas_ids", "int64", (BATCH, c)),
            TensorSpec("sc_embeds", kv_dtype(precision), (BATCH, c, h)),
            TensorSpec("temperature", "float32", (BATCH,)),
            TensorSpec("position_ids", "int64", (BATCH, c)),
            *_past(cfg, kv_dtype(precision))]


def denoiser_outputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    c = cfg.canvas_length
    return [TensorSpec("logits", "float32", (BATCH, c, cfg.vocab_size)),
            TensorSpec("next_sc_embeds", kv_dtype(precision), (BATCH, c, cfg.hidden_size))]


def inputs(graph: str, cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    return {ENCODER: encoder_inputs, DENOISER: denoiser_inputs}[graph](cfg, precision)


def outputs(graph: str, cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    return {ENCODER: encoder_outputs, DENOISER: denoiser_outputs}[graph](cfg, precision)


def contract(cfg: ModelConfig, precision: str = "bf16") -> dict:
    """JSON form of both graphs' IO (written into every manifest and compared on load)."""
    return {"version": CONTRACT_VERSION, **{
        g: {"inputs": [asdict(t) | {"dims": list(t.dims)} for t in inputs(g, cfg, precision)],
            "outputs": [asdict(t) | {"dims": list(t.dims)} for t in outputs(g, cfg, precision)]}
        for g in GRAPHS}}


def contract_hash(cfg: ModelConfig, precision: str = "bf16") -> str:
    return hashlib.sha256(json.dumps(contract(cfg, precision), sort_keys=True).encode()).hexdigest()[:16]


# -- optimisation profiles -----------------------------------------------------------------------------------
def dim_ranges(cfg: ModelConfig, gpu) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per symbolic input dim for a GpuProfile (max_batch, opt_batch, max_prompt, max_context).

    `seq` covers prompts up to max_prompt and the canvas commit (C tokens); `past_full` is P with P + seq <=
    max_context; `past_sliding` saturates at W-1. Past lengths start at 0 (first prefill has an empty cache).
    """
    c, keep = cfg.canvas_length, cfg.sliding_cache_len
    max_seq = max(gpu.max_prompt, c)
    if gpu.max_context <= c:
        raise ConfigError(f"GPU profile {gpu.name!r}: max_context={gpu.max_context} must exceed the canvas length "
                          f"{c}; raise max_context in dgemma.profiles.")
    max_past = gpu.max_context - 1
    opt_past = min(max_past, max(1, gpu.max_context // 2))
    return {
        BATCH: (1, max(1, min(gpu.opt_batch, gpu.max_batch)), gpu.max_batch),
        SEQ: (1, min(c, max_seq), max_seq),
        PAST_FULL: (0, opt_past, max_past),
        PAST_SLIDING: (0, min(keep, opt_past), keep),
    }


def profile_shapes(graph: str, cfg: ModelConfig, gpu,
                   precision: str = "bf16") -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input name: (min shape, opt shape, max shape)} for one TensorRT optimisation profile."""
    ranges = dim_ranges(cfg, gpu)
    out = {}
    for t in inputs(graph, cfg, precision):
        shapes = []
        for k in range(3):
            shapes.append(tuple(d if isinstance(d, int) else ranges[d][k] for d in t.dims))
        out[t.name] = tuple(shapes)
    return out
