"""THE IO contracts: the two graphs (`encoder`, `denoiser`) and the served `dgemma` Triton model.

Graphs: `TensorSpec` lists derived from a ModelConfig (and the weight dtype of the export precision), the
min/opt/max optimisation-profile shapes derived from a GpuProfile, and how the tensors look in a Triton config and
on the wire. Served model: its inputs and outputs (names, Triton dtypes, optional or not). Export, the ONNX Runtime
backend, the engine builder, the Triton models, the client and the tests read names and dims from here and nowhere
else. Knows nothing of torch, ONNX, TensorRT or Triton's python API.

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


# -- graphs as Triton models --------------------------------------------------------------------------------------
TRITON_DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16",
                 "bool": "TYPE_BOOL"}


def triton_dims(t: TensorSpec) -> tuple[list[int], bool]:
    """(dims without the batch dim, needs reshape to []) for a config.pbtxt with max_batch_size > 0."""
    if not t.dims or t.dims[0] != BATCH:
        raise ConfigError(f"graph tensor {t.name} {list(t.dims)} does not start with the batch dim; Triton's "
                          "batching needs it first (dgemma.core.contract).")
    rest = [d if isinstance(d, int) else -1 for d in t.dims[1:]]
    return (rest, False) if rest else ([1], True)


def io_block(specs) -> str:
    """config.pbtxt rows for `input [ ... ]` / `output [ ... ]` of a graph model."""
    rows = []
    for t in specs:
        dims, reshape = triton_dims(t)
        rows.append(f'  {{ name: "{t.name}" data_type: {TRITON_DTYPES[t.dtype]} dims: [ {", ".join(map(str, dims))} ]'
                    + (" reshape: { shape: [ ] }" if reshape else "") + " }")
    return ",\n".join(rows)


def wire_shape(t: TensorSpec, shape) -> tuple[int, ...]:
    """The shape a caller (BLS, a client) sends for a tensor of this spec: [B] tensors go as [B, 1]."""
    return (shape[0], 1) if len(t.dims) == 1 else tuple(shape)


# -- the served `dgemma` model --------------------------------------------------------------------------------------
# max_batch_size 1 (no dynamic batching: the model batches requests itself, in flight): every tensor carries a
# leading batch dim of 1 on the wire ([1, 1] for a scalar), the shapes Triton's own OpenAI frontend sends.
MODEL = "dgemma"
# inputs: name -> (Triton dtype, optional, dims without the batch dim)
MODEL_INPUTS = {
    "text_input": ("TYPE_STRING", False, 1),  # user text (the model applies the chat template), or a prompt
                                              # already rendered, starting with "<bos>"
    "max_tokens": ("TYPE_INT32", True, 1),
    "seed": ("TYPE_UINT64", True, 1),  # uint64, as Triton's OpenAI frontend types it
    "stream": ("TYPE_BOOL", True, 1),
    "max_denoising_steps": ("TYPE_INT32", True, 1),
    "entropy_bound": ("TYPE_FP32", True, 1),
    "ignore_eos": ("TYPE_BOOL", True, 1),
    "infill": ("TYPE_STRING", True, 1),
    "temperature_min": ("TYPE_FP32", True, 1),  # the denoising temperature range, T(n) from max down to min
    "temperature_max": ("TYPE_FP32", True, 1),
    "temperature": ("TYPE_FP32", True, 1),  # OpenAI-style: the top of the range (see request.temperature_range)
    "adaptive_stopping": ("TYPE_BOOL", True, 1),  # false: always max_denoising_steps (the vLLM anchor setting)
    "stream_drafts": ("TYPE_BOOL", True, 1),  # with stream: also a draft (the argmax canvas) after every step
    "stop_words": ("TYPE_STRING", True, -1),  # stop sequences: the text is cut at the first, generation ends there
    "return_logprobs": ("TYPE_BOOL", True, 1),  # the committed tokens' log-probabilities
    "top_logprobs": ("TYPE_INT32", True, 1),  # and the 0..5 most likely alternatives at each position
    "return_num_input_tokens": ("TYPE_BOOL", True, 1),
    "return_num_output_tokens": ("TYPE_BOOL", True, 1),
    "exclude_input_in_output": ("TYPE_BOOL", True, 1),  # genai-perf / the OpenAI frontend send it; never echoed
    "top_p": ("TYPE_FP32", True, 1),  # sent by Triton's OpenAI frontend when set: only the neutral values pass
    "frequency_penalty": ("TYPE_FP32", True, 1),
    "presence_penalty": ("TYPE_FP32", True, 1),
}
# outputs: name -> (Triton dtype, dims without the batch dim)
MODEL_OUTPUTS = {
    "text_output": ("TYPE_STRING", [1]),
    "canvas_index": ("TYPE_INT32", [1]),
    "canvases": ("TYPE_INT32", [1]),
    "steps_per_canvas": ("TYPE_INT32", [-1]),
    "tokens_per_forward": ("TYPE_FP32", [1]),
    "is_draft": ("TYPE_BOOL", [1]),  # true: a denoising step's draft of canvas canvas_index, not committed text
    "finish_reason": ("TYPE_STRING", [1]),  # in the last response: "stop" (EOS or a stop sequence) | "length"
    "output_token_ids": ("TYPE_INT64", [-1]),  # with return_logprobs: the tokens of this response's text
    "output_logprobs": ("TYPE_FP32", [-1]),  # their log-probabilities under the step that fixed them
    "output_top_logprob_ids": ("TYPE_INT64", [-1, -1]),  # [tokens, top_logprobs]; not named like the input
    "output_top_logprobs": ("TYPE_FP32", [-1, -1]),  # top_logprobs: an ensemble has one tensor namespace
    "num_input_tokens": ("TYPE_UINT32", [1]),  # with return_num_input_tokens: prompt tokens (every response)
    "num_output_tokens": ("TYPE_UINT32", [1]),  # with return_num_output_tokens: tokens in this response
}
# The `ensemble` rendering (tooling that expects tensorrtllm_backend's layout): the ensemble takes MODEL_INPUTS and
# answers MODEL_OUTPUTS through three steps: `preprocess` (validation, chat template, tokens -> the request as
# JSON), `canvas_loop` (the scheduler: token ids instead of text, every output in every response) and
# `postprocess` (token ids -> text_output).
ENSEMBLE = "ensemble"
ENSEMBLE_STEPS = ("preprocess", "canvas_loop", "postprocess")
REQUEST = "request"  # preprocess -> canvas_loop: dgemma.serving.request.Request as JSON
OUTPUT_IDS = "output_ids"  # canvas_loop -> postprocess: the response's tokens (a draft's whole canvas)
CANVAS_LOOP_OUTPUTS = {OUTPUT_IDS: ("TYPE_INT64", [-1]),
                       **{k: v for k, v in MODEL_OUTPUTS.items() if k != "text_output"}}
# Triton config type -> (wire datatype, numpy dtype name) for clients
WIRE_DTYPES = {"TYPE_STRING": ("BYTES", "object"), "TYPE_INT32": ("INT32", "int32"), "TYPE_INT64": ("INT64", "int64"),
               "TYPE_BOOL": ("BOOL", "bool"), "TYPE_FP32": ("FP32", "float32"), "TYPE_UINT32": ("UINT32", "uint32"),
               "TYPE_UINT64": ("UINT64", "uint64")}
