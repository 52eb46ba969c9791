"""Validation of /v1/completions and /v1/chat/completions bodies into a `Generation`: the prompt text for
the `dgemma` model (always starting with <bos>, so the model tokenizes it as is) and the model inputs.

Known fields are checked strictly (type, range, finiteness, encodability); unknown top-level fields are
ignored as OpenAI does. Parameters DiffusionGemma cannot honour are refused (400) rather than ignored:
n > 1, best_of > 1, echo, suffix, logit_bias, tools / functions, response_format other than text, top_p != 1,
frequency/presence penalties != 0. Diffusion extras: max_denoising_steps, entropy_bound, adaptive_stopping,
infill, ignore_eos, stream_drafts (top-level, documented in README)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import RequestError
from .errors import ApiError, bad_request

INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1  # the model's seed input is INT64 >= 0
MAX_STOP = 4
MAX_STOP_BYTES = 1024
MAX_LOGPROBS = 5  # the model's top_logprobs input holds 0..5


@dataclass
class Generation:
    kind: str  # "chat" | "completion"
    prompt: str  # text_input: a fully rendered prompt starting with <bos>
    inputs: dict[str, Any]  # other model inputs by name (None values are not sent)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the chosen token and the top k alternatives
    seed: int = 0
    needs: set[str] = field(default_factory=set)  # model inputs a requested feature cannot do without


def _type_name(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"{name} must be an integer (got {_type_name(v)}).", name)
    if not lo <= v <= hi:
        raise bad_request(f"{name} must be in {lo}..{hi} (got {v}).", name)
    return v


def _number(body: dict, name: str, lo: float, hi: float | None = None, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"{name} must be a number (got {_type_name(v)}).", name)
    if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        rng = f"> {lo}" if lo_open and hi is None else f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(f"{name} must be {rng} (got {v}).", name)
    return float(v)


def _boolean(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad_request(f"{name} must be a boolean (got {_type_name(v)}).", name)
    return v


def _text(v, name: str) -> str:
    if not isinstance(v, str):
        raise bad_request(f"{name} must be a string (got {_type_name(v)}).", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800" parses but is no UTF-8 text
        raise bad_request(f"{name} holds an unpaired UTF-16 surrogate escape; send valid Unicode text.", name) from None
    return v


def _string(body: dict, name: str) -> str | None:
    v = body.get(name)
    return None if v is None else _text(v, name)


def _refuse(body: dict, name: str, allowed: tuple = (None,), why: str = "") -> None:
    v = body.get(name)
    # type-strict: True == 1 and 0 == False in Python, but n=true or echo=0 are wrong types, not defaults
    if not any(v is a or (type(v) is type(a) and v == a) for a in allowed):
        raise bad_request(f"{name}={_short(v)} is not supported by this server{why}.", name, "unsupported_parameter")


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _stop(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP:
        raise bad_request(f"stop must be a string or a list of 1..{MAX_STOP} strings (got {_short(v)}).", "stop")
    for i, s in enumerate(stops):
        _text(s, f"stop[{i}]")
        if not s or len(s.encode("utf-8")) > MAX_STOP_BYTES:
            raise bad_request(f"stop[{i}] must be a non-empty string of at most {MAX_STOP_BYTES} bytes "
                              f"(got {len(s.encode('utf-8'))} bytes).", "stop")
    return stops


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is None:
        raise bad_request("model is required (GET /v1/models lists it).", "model")
    _text(model, "model")
    if model != served:
        raise ApiError(404, f"The model `{model[:200]}` does not exist; this server serves `{served}`.", "model",
                       "model_not_found")


def _common(body: dict, kind: str) -> tuple[dict, Generation]:
    """Fields both endpoints share -> (model inputs, a Generation without prompt)."""
    for name, allowed, why in (("n", (None, 1), " (one choice per request)"),
                               ("logit_bias", (None, {}), " (the denoiser has no logit bias)"),
                               ("top_p", (None, 1, 1.0), " (DiffusionGemma's sampler has no nucleus cut; use "
                                                         "temperature)"),
                               ("frequency_penalty", (None, 0, 0.0), ""), ("presence_penalty", (None, 0, 0.0), "")):
        _refuse(body, name, allowed, why)
    stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        if not isinstance(options, dict):
            raise bad_request(f"stream_options must be an object (got {_type_name(options)}).", "stream_options")
        include_usage = bool(_boolean(options, "include_usage"))
    drafts = _boolean(body, "stream_drafts")
    if drafts and not stream:
        raise bad_request("stream_drafts sends each denoising step's draft as an SSE chunk; it needs stream=true.",
                          "stream_drafts")
    seed = _integer(body, "seed", 0, SEED_MAX)
    seed = secrets.randbits(63) if seed is None else seed  # OpenAI: no seed, a fresh sample every time
    inputs = {
        "seed": seed, "stream": stream, "stream_drafts": drafts or None,
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "stop_words": _stop(body),
        "max_denoising_steps": _integer(body, "max_denoising_steps", 1, INT32_MAX),
        "entropy_bound": _number(body, "entropy_bound", 0.0, lo_open=True),
        "adaptive_stopping": _boolean(body, "adaptive_stopping"),
        "ignore_eos": _boolean(body, "ignore_eos"),
        "infill": _string(body, "infill"),
        "return_num_input_tokens": True, "return_num_output_tokens": True,
    }
    gen = Generation(kind, "", inputs, stream=stream, include_usage=include_usage, seed=seed)
    return inputs, gen


def completion(body: dict, served: str) -> Generation:
    check_model(body, served)
    for name, allowed, why in (("best_of", (None, 1), " (one candidate per request)"),
                               ("echo", (None, False), " (the answer never repeats the prompt)"),
                               ("suffix", (None,), " (use the infill extra field for fill-in-the-middle)")):
        _refuse(body, name, allowed, why)
    inputs, gen = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("prompt must be a string or a list holding exactly one string (batches and token "
                              "id lists are not supported).", "prompt", "unsupported_parameter")
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("prompt is required.", "prompt")
    prompt = _text(prompt, "prompt")
    if not prompt.strip():
        raise bad_request("prompt is empty; give some text to continue.", "prompt")
    gen.prompt = prompt if prompt.startswith("<bos>") else "<bos>" + prompt  # never two BOS tokens
    inputs["max_tokens"] = _integer(body, "max_tokens", 1, INT32_MAX)
    k = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    _logprobs(gen, k)
    return gen


def chat(body: dict, served: str, render) -> Generation:
    """render(messages) -> prompt text (the checkpoint's chat template; raises RequestError)."""
    check_model(body, served)
    for name in ("tools", "functions"):
        _refuse(body, name, (None, []), " (no tool calling)")
    _refuse(body, "function_call", (None, "none"), " (no tool calling)")
    _refuse(body, "tool_choice", (None, "none"), " (no tool calling)")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise bad_request(f"response_format={_short(rf)} is not supported; only {{\"type\": \"text\"}}.",
                          "response_format", "unsupported_parameter")
    inputs, gen = _common(body, "chat")
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages is required.", "messages")
    try:
        gen.prompt = render(messages)
    except RequestError as e:
        raise bad_request(str(e), "messages") from None
    _text(gen.prompt, "messages")
    mt, mct = _integer(body, "max_tokens", 1, INT32_MAX), _integer(body, "max_completion_tokens", 1, INT32_MAX)
    if mt is not None and mct is not None and mt != mct:
        raise bad_request(f"max_tokens={mt} and max_completion_tokens={mct} disagree; send one of them.",
                          "max_completion_tokens")
    inputs["max_tokens"] = mct if mct is not None else mt
    want = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad_request("top_logprobs needs logprobs=true.", "top_logprobs")
    _logprobs(gen, (top or 0) if want else None)
    return gen


def _logprobs(gen: Generation, k: int | None) -> None:
    gen.logprobs = k
    if k is not None:
        gen.inputs.update(return_logprobs=True, top_logprobs=k)


# model inputs a request may set without the model declaring them (the answer just lacks what they return)
OPTIONAL = frozenset({"return_num_input_tokens", "return_num_output_tokens"})
# request field each model input comes from, for the refusal when the served model lacks the input
FIELDS = {"stop_words": "stop", "temperature": "temperature", "return_logprobs": "logprobs",
          "top_logprobs": "logprobs", "stream_drafts": "stream_drafts", "infill": "infill"}


def model_inputs(gen: Generation, declared: set[str]) -> dict[str, Any]:
    """The inputs to send: None values dropped, OPTIONAL ones the model lacks dropped; any other input the
    model does not declare is refused naming the request field (a repository rendered by an older dgemma)."""
    out = {}
    for name, v in gen.inputs.items():
        if v is None:
            continue
        if name not in declared:
            if name in OPTIONAL:
                continue
            f = FIELDS.get(name, name)
            raise bad_request(f"{f} is not supported by the served dgemma model (it has no `{name}` input); "
                              "re-render the Triton repository with this dgemma version (make repo).", f,
                              "unsupported_parameter")
        out[name] = v
    return out
