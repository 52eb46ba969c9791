"""Requests of the Triton `dgemma` model, independent of Triton: what a rendered repository allows (`Limits`, from
the GpuProfile and the checkpoint, written into config.pbtxt parameters by the render) and `parse_request`, which
turns the model's inputs (numpy arrays by name, dgemma.core.contract.MODEL_INPUTS) into a validated `Request` or
raises RequestError naming the value, the limit and where the limit comes from. Cheap checks come first: a prompt
whose byte length alone proves it too long is refused before it is tokenized."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.contract import MODEL_INPUTS
from ..core.errors import RequestError


@dataclass(frozen=True)
class Limits:
    """What one rendered repository accepts; every field names its source in error messages."""

    target: str  # "<gpu>/<precision>"
    max_prompt: int  # GpuProfile.max_prompt
    max_context: int  # GpuProfile.max_context (prompt + output tokens)
    canvas_length: int  # checkpoint config.json
    max_denoising_steps: int  # checkpoint generation_config.json
    default_max_tokens: int  # checkpoint generation_config.json max_new_tokens
    default_entropy_bound: float
    default_t_min: float = 0.4  # checkpoint generation_config.json sampler_config
    default_t_max: float = 0.8

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "Limits":
        """From a model config's `parameters` (string values, as Triton hands them to initialize())."""
        try:
            return cls(target=params["target"], max_prompt=int(params["max_prompt"]),
                       max_context=int(params["max_context"]), canvas_length=int(params["canvas_length"]),
                       max_denoising_steps=int(params["max_denoising_steps"]),
                       default_max_tokens=int(params["default_max_tokens"]),
                       default_entropy_bound=float(params["default_entropy_bound"]),
                       default_t_min=float(params["default_t_min"]), default_t_max=float(params["default_t_max"]))
        except KeyError as e:
            raise RequestError(f"model config lacks parameter {e}; re-render with `make repo`.") from None


RENDERED_PREFIX = "<bos>"  # a text_input that starts with it is a rendered prompt (Triton's OpenAI frontend, ours)
MIN_TEMPERATURE = 0.01  # the top of the temperature range; below it raw / T overflows fp32 (spec §11)
MAX_TEMPERATURE = 2.0  # the OpenAI `temperature` range
MAX_TOP_LOGPROBS = 5
MAX_STOP_WORDS, MAX_STOP_BYTES = 16, 256
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class Request:
    input_ids: tuple[int, ...]
    max_tokens: int
    seed: int
    stream: bool
    max_denoising_steps: int
    entropy_bound: float
    ignore_eos: bool
    infill: str | None = None
    t_min: float = 0.4
    t_max: float = 0.8
    adaptive_stopping: bool = True
    stream_drafts: bool = False
    stop_words: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; K: the chosen tokens' log-probabilities and K alternatives
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str | bytes) -> "Request":
        d = json.loads(s)
        d["input_ids"] = tuple(d["input_ids"])
        d["stop_words"] = tuple(d["stop_words"])
        return cls(**d)


def _text(name: str, v) -> str:
    """A BYTES element as text: strict UTF-8 (overlong forms and encoded surrogates are refused too)."""
    if isinstance(v, str):
        return v
    if not isinstance(v, (bytes, np.bytes_)):
        raise RequestError(f"{name} must be text (got {type(v).__name__}).")
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name} is not valid UTF-8: byte 0x{bytes(v)[e.start]:02x} at offset {e.start} "
                           f"({e.reason}). Send UTF-8 text.") from None


def _scalar(inputs: dict[str, Any], name: str):
    """The single element of an optional input (BYTES decoded as strict UTF-8), or None when absent."""
    a = inputs.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise RequestError(f"{name} must hold exactly one value (got {a.size}: shape {list(a.shape)}).")
    v = a.reshape(-1)[0]
    if isinstance(v, (bytes, np.bytes_, str)):
        return _text(name, v)
    return v.item() if hasattr(v, "item") else v


def _int(name: str, v, lo: int, hi: int | None, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise RequestError(f"{name} must be an integer (got {v!r}).")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise RequestError(f"{name} must be an integer {rng} (got {v}){'; ' + source if source else ''}.")
    return v


def _float(name: str, v, lo: float, hi: float | None = None, strict_lo: bool = False, why: str = "") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            (v <= lo if strict_lo else v < lo) or (hi is not None and v > hi):
        rng = (f"> {lo:g}" if strict_lo else f">= {lo:g}") + (f" and <= {hi:g}" if hi is not None else "")
        raise RequestError(f"{name} must be a finite number {rng} (got {v!r}){why}.")
    return float(v)


def temperature_range(inputs: dict[str, Any], limits: "Limits") -> tuple[float, float]:
    """(t_min, t_max) of the denoising schedule T(n) = t_min + (t_max - t_min) * n / N. `temperature` (OpenAI
    style, 0..2) sets the top of the range and keeps the checkpoint's ratio: t_max = max(T, MIN_TEMPERATURE),
    t_min = t_max * default_t_min / default_t_max (0.8 gives the checkpoint's own 0.4..0.8); or
    `temperature_min` / `temperature_max` set the range itself."""
    t = _scalar(inputs, "temperature")
    t_min, t_max = _scalar(inputs, "temperature_min"), _scalar(inputs, "temperature_max")
    if t is not None:
        if t_min is not None or t_max is not None:
            raise RequestError("give either temperature (OpenAI style) or temperature_min/temperature_max, not both.")
        t = _float("temperature", t, 0.0, MAX_TEMPERATURE, why=" (the OpenAI range)")
        top = max(t, MIN_TEMPERATURE)
        return top * limits.default_t_min / limits.default_t_max, top
    t_min = _float("temperature_min", limits.default_t_min if t_min is None else t_min, 0.0)
    t_max = _float("temperature_max", limits.default_t_max if t_max is None else t_max, MIN_TEMPERATURE,
                   why=f"; below {MIN_TEMPERATURE} the scaled logits overflow")
    if t_max <= t_min:
        raise RequestError(f"temperature range must have temperature_min < temperature_max (got {t_min:.6g} and "
                           f"{t_max:.6g}; the checkpoint's defaults are {limits.default_t_min} and "
                           f"{limits.default_t_max}, generation_config.json sampler_config).")
    return t_min, t_max


def _stop_words(inputs: dict[str, Any]) -> tuple[str, ...]:
    a = inputs.get("stop_words")
    if a is None:
        return ()
    words = [_text("stop_words", v) for v in np.asarray(a).reshape(-1)]
    if len(words) > MAX_STOP_WORDS:
        raise RequestError(f"stop_words holds {len(words)} sequences; at most {MAX_STOP_WORDS}.")
    for w in words:
        if not w or len(w.encode()) > MAX_STOP_BYTES:
            raise RequestError(f"each stop word must be 1..{MAX_STOP_BYTES} bytes of text (got {w[:40]!r}).")
    return tuple(words)


def _neutral(inputs: dict[str, Any]) -> None:
    """top_p / penalties, which Triton's OpenAI frontend forwards when a client sets them: refused unless neutral
    (a block-diffusion canvas has no next-token distribution to truncate or penalise)."""
    for name, neutral in (("top_p", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        v = _scalar(inputs, name)
        if v is not None and v != neutral:
            raise RequestError(f"{name}={v:g} is not supported by DiffusionGemma's canvas sampler; leave it unset "
                               f"(or {neutral:g}).")


def parse_request(inputs: dict[str, Any], limits: Limits, tok) -> Request:
    """Validate the model's inputs against `limits`. tok: the checkpoint's dgemma.model.tokens.Tokenizer (renders
    and tokenizes the user text; a text starting with <bos> is taken as a rendered prompt)."""
    unknown = sorted(set(inputs) - set(MODEL_INPUTS))
    if unknown:
        raise RequestError(f"unknown input(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(MODEL_INPUTS)}.")
    raw = inputs.get("text_input")
    nbytes = sum(len(x) for x in np.asarray(raw).reshape(-1) if isinstance(x, (bytes, np.bytes_))) if raw is not None \
        else 0
    most = limits.max_prompt * tok.max_token_bytes + 256  # the chat template adds a few tokens
    if nbytes > most:  # checked before decoding or tokenizing: a huge prompt costs nothing
        raise RequestError(f"text_input has {nbytes} bytes; {limits.target} holds at most {limits.max_prompt} prompt "
                           f"tokens (GpuProfile.max_prompt) and no token is longer than {tok.max_token_bytes} bytes, "
                           f"so at most {most} bytes can fit. Shorten the prompt.")
    text = _scalar(inputs, "text_input")
    if text is None or not text.strip():
        raise RequestError(f"text_input is empty (got {text!r}); give some text to answer.")
    ids = list(tok.encode(text) if text.startswith(RENDERED_PREFIX) else tok.encode_chat(text))
    if len(ids) > limits.max_prompt:
        raise RequestError(f"prompt has {len(ids)} tokens; {limits.target} holds at most {limits.max_prompt} prompt "
                           "tokens (GpuProfile.max_prompt). Shorten the prompt.")
    c = limits.canvas_length
    room = (limits.max_context - len(ids)) // c * c  # whole canvases that still fit
    mt = _scalar(inputs, "max_tokens")
    if mt is None:
        mt = min(limits.default_max_tokens, max(room, c))
    mt = _int("max_tokens", mt, 1, None, f"output comes in whole {c}-token canvases")
    n_canvases = math.ceil(mt / c)
    total = len(ids) + n_canvases * c
    if total > limits.max_context:
        raise RequestError(
            f"max_tokens={mt} needs {n_canvases} canvas(es) of {c}: prompt {len(ids)} + {n_canvases * c} = {total} "
            f"tokens; {limits.target} holds at most {limits.max_context} prompt+output tokens "
            f"(GpuProfile.max_context). Use max_tokens <= {max(room, 0)} for this prompt.")
    seed = _scalar(inputs, "seed")
    seed = 0 if seed is None else _int("seed", seed, 0, SEED_MAX, "")
    steps = _scalar(inputs, "max_denoising_steps")
    steps = limits.max_denoising_steps if steps is None else _int(
        "max_denoising_steps", steps, 1, limits.max_denoising_steps,
        "the checkpoint's generation_config.json sets the maximum")
    eb = _scalar(inputs, "entropy_bound")
    eb = limits.default_entropy_bound if eb is None else _float(
        "entropy_bound", eb, 0.0, strict_lo=True,
        why=f"; the checkpoint default is {limits.default_entropy_bound} (generation_config.json sampler_config)")
    infill = _scalar(inputs, "infill")
    if infill is not None:
        if "_" not in infill:
            raise RequestError(f"infill must be a canvas template with at least one '_' hole (got {infill[:60]!r}).")
        n_tmpl = sum(len(tok.encode(part)) for part in infill.split("_") if part) + infill.count("_")
        if n_tmpl > n_canvases * c:
            raise RequestError(f"infill template has {n_tmpl} tokens, past the {n_canvases} canvas(es) of {c} that "
                               f"max_tokens={mt} gives; raise max_tokens to at least {n_tmpl} (within the context) or "
                               "shorten the template.")
    t_min, t_max = temperature_range(inputs, limits)
    _neutral(inputs)
    top = _scalar(inputs, "top_logprobs")
    top = None if top is None else _int("top_logprobs", top, 0, MAX_TOP_LOGPROBS, "alternatives per token")
    logprobs = (top or 0) if bool(_scalar(inputs, "return_logprobs")) or top else None
    adaptive = _scalar(inputs, "adaptive_stopping")
    return Request(tuple(int(i) for i in ids), mt, seed, bool(_scalar(inputs, "stream")), steps, eb,
                   bool(_scalar(inputs, "ignore_eos")), infill, t_min, t_max,
                   True if adaptive is None else bool(adaptive), bool(_scalar(inputs, "stream_drafts")),
                   _stop_words(inputs), logprobs, bool(_scalar(inputs, "return_num_input_tokens")),
                   bool(_scalar(inputs, "return_num_output_tokens")))
