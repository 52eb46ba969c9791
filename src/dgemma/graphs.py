"""THE IO contract of the two graphs, `encoder` and `denoiser`: tensor names, dtypes, symbolic dims, shape profiles.

Owns `TensorSpec` lists derived from a ModelConfig (and the weight dtype of the export precision) and the
min/opt/max optimisation-profile shapes derived from a GpuProfile. Export, the ONNX Runtime backend, the engine
builder, the Triton models and the tests read names and dims from here and nowhere else. Knows nothing of torch,
ONNX or TensorRT.

Fixed-capacity KV (contract v2, spec §10 "better for production"): both graphs read per-layer K/V buffers of a
fixed capacity plus `past_length` [B] (tokens cached per row); full layers hold positions 0..P-1 in slots
0..P-1 of a `kv_capacity`-long buffer, sliding layers hold the last min(P, W-1) tokens in order at the front of a
static W-1 buffer. The encoder returns only the K/V of its new tokens (`new_key_i`, `new_value_i`); the runtime
appends them (dgemma.runtime.kvbuf). Equal shapes for every request make Triton dynamic batching possible and
keep the graphs free of growing concats. Symbolic dims: `batch`, `seq` (encoder tokens), `kv_capacity`; the
canvas length and the sliding capacity are static.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .config import ModelConfig
from .errors import ConfigError

ENCODER, DENOISER = "encoder", "denoiser"
GRAPHS = (ENCODER, DENOISER)
BATCH, SEQ, KV_CAPACITY = "batch", "seq", "kv_capacity"
PAST_LENGTH = "past_length"
CONTRACT_VERSION = 2

# export precision -> dtype of the graph's activations, KV and sc_embeds ("fp32" is the CPU/ONNX Runtime reference
# form). fp8 graphs are float32 so ONNX Runtime's CPU provider runs the same graph TensorRT-RTX builds (it has no bf16
# kernels); nvfp4 graphs stay bf16 (TensorRT only). See dgemma.export_quant.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "float32", "nvfp4": "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch-style name: int64, float32, bfloat16
    dims: tuple[int | str, ...]  # int = static, str = symbolic dim name


def past_key(i: int) -> str:
    return f"past_key_{i}"


def past_value(i: int) -> str:
    return f"past_value_{i}"


def new_key(i: int) -> str:
    return f"new_key_{i}"


def new_value(i: int) -> str:
    return f"new_value_{i}"


def kv_dtype(precision: str) -> str:
    if precision not in PRECISION_DTYPES:
        raise ConfigError(f"unknown export precision {precision!r}; valid: {', '.join(PRECISION_DTYPES)}.")
    return PRECISION_DTYPES[precision]


def _kv(cfg: ModelConfig, dtype: str, key, value, length) -> list[TensorSpec]:
    """Per-layer K/V specs [B, kvh_i, length(sliding), hd_i] in contract order (key_0, value_0, key_1, ...)."""
    out = []
    for i in range(cfg.num_hidden_layers):
        dims = (BATCH, cfg.layer_kv_heads(i), length(cfg.is_sliding(i)), cfg.layer_head_dim(i))
        out += [TensorSpec(key(i), dtype, dims), TensorSpec(value(i), dtype, dims)]
    return out


def past(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    """The KV buffers both graphs read: kv_capacity slots (full layers), W-1 slots (sliding layers)."""
    return _kv(cfg, kv_dtype(precision), past_key, past_value,
               lambda sliding: cfg.sliding_cache_len if sliding else KV_CAPACITY)


def _new_kv(cfg: ModelConfig, dtype: str) -> list[TensorSpec]:
    return _kv(cfg, dtype, new_key, new_value, lambda sliding: SEQ)


def encoder_inputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    return [TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("position_ids", "int64", (BATCH, SEQ)),
            TensorSpec(PAST_LENGTH, "int64", (BATCH,)), *past(cfg, precision)]


def encoder_outputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    return _new_kv(cfg, kv_dtype(precision))


def denoiser_inputs(cfg: ModelConfig, precision: str = "bf16") -> list[TensorSpec]:
    c, h = cfg.canvas_length, cfg.hidden_size
    return [TensorSpec("canvas_ids", "int64", (BATCH, c)),
            TensorSpec("sc_embeds", kv_dtype(precision), (BATCH, c, h)),
            TensorSpec("temperature", "float32", (BATCH,)),
            TensorSpec("position_ids", "int64", (BATCH, c)), TensorSpec(PAST_LENGTH, "int64", (BATCH,)),
            *past(cfg, precision)]


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

    `seq` covers prompts up to max_prompt and the canvas commit (C tokens); `kv_capacity` is the runtime's
    buffer length, which it sets to max_context (a smaller buffer is allowed down to one canvas).
    """
    c = cfg.canvas_length
    max_seq = max(gpu.max_prompt, c)
    if gpu.max_context <= c:
        raise ConfigError(f"GPU profile {gpu.name!r}: max_context={gpu.max_context} must exceed the canvas length "
                          f"{c}; raise max_context in dgemma.profiles.")
    return {
        BATCH: (1, max(1, min(gpu.opt_batch, gpu.max_batch)), gpu.max_batch),
        SEQ: (1, min(c, max_seq), max_seq),
        KV_CAPACITY: (c, gpu.max_context, gpu.max_context),
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
