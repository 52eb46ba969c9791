"""Requests of the Triton `dgemma` model, independent of Triton: what a rendered repository allows (`Limits`, from
the GpuProfile and the checkpoint, written into config.pbtxt parameters by the render) and `parse_request`, which
turns the model's inputs (numpy arrays by name, dgemma.core.contract.MODEL_INPUTS) into a validated `Request` or
raises RequestError naming the value, the limit and where the limit comes from."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str | bytes) -> "Request":
        d = json.loads(s)
        d["input_ids"] = tuple(d["input_ids"])
        return cls(**d)


def _scalar(inputs: dict[str, Any], name: str):
    """The single element of an optional input, or None when absent."""
    a = inputs.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise RequestError(f"{name} must hold exactly one value (got {a.size}: shape {list(a.shape)}).")
    v = a.reshape(-1)[0]
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v


def _int(name: str, v, lo: int, hi: int | None, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise RequestError(f"{name} must be an integer (got {v!r}).")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise RequestError(f"{name} must be an integer {rng} (got {v}){'; ' + source if source else ''}.")
    return v


def parse_request(inputs: dict[str, Any], limits: Limits, encode_chat: Callable[[str], list[int]]) -> Request:
    """Validate the model's inputs against `limits`; `encode_chat` renders and tokenizes the user text."""
    unknown = sorted(set(inputs) - set(MODEL_INPUTS))
    if unknown:
        raise RequestError(f"unknown input(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(MODEL_INPUTS)}.")
    text = _scalar(inputs, "text_input")
    if text is None or not isinstance(text, str) or not text.strip():
        raise RequestError(f"text_input is empty (got {text!r}); give some text to answer.")
    ids = list(encode_chat(text))
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
    seed = 0 if seed is None else _int("seed", seed, 0, 2**63 - 1, "")
    stream = _scalar(inputs, "stream")
    steps = _scalar(inputs, "max_denoising_steps")
    steps = limits.max_denoising_steps if steps is None else _int(
        "max_denoising_steps", steps, 1, limits.max_denoising_steps,
        "the checkpoint's generation_config.json sets the maximum")
    eb = _scalar(inputs, "entropy_bound")
    if eb is None:
        eb = limits.default_entropy_bound
    elif isinstance(eb, bool) or not isinstance(eb, (int, float)) or not math.isfinite(eb) or eb <= 0:
        raise RequestError(f"entropy_bound must be a finite number > 0 (got {eb!r}); the checkpoint default is "
                           f"{limits.default_entropy_bound} (generation_config.json sampler_config).")
    infill = _scalar(inputs, "infill")
    if infill is not None and (not isinstance(infill, str) or "_" not in infill):
        raise RequestError(f"infill must be a canvas template with at least one '_' hole (got {infill!r}).")
    t_min, t_max = _scalar(inputs, "temperature_min"), _scalar(inputs, "temperature_max")
    t_min = limits.default_t_min if t_min is None else t_min
    t_max = limits.default_t_max if t_max is None else t_max
    for name, v in (("temperature_min", t_min), ("temperature_max", t_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise RequestError(f"{name} must be a finite number >= 0 (got {v!r}).")
    if t_max <= t_min:
        raise RequestError(f"temperature range must have temperature_min < temperature_max (got {t_min:.6g} and {t_max:.6g}; "
                           f"the checkpoint's defaults are {limits.default_t_min} and {limits.default_t_max}, "
                           "generation_config.json sampler_config).")
    adaptive = _scalar(inputs, "adaptive_stopping")
    return Request(tuple(int(i) for i in ids), mt, seed, bool(stream), steps, float(eb),
                   bool(_scalar(inputs, "ignore_eos")), infill, float(t_min), float(t_max),
                   True if adaptive is None else bool(adaptive), bool(_scalar(inputs, "stream_drafts")))
