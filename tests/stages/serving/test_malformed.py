"""Hostile requests straight at Triton's doors (the `dgemma` model over gRPC, and Triton's own HTTP /generate on
loopback), as a fuzzing client sends them: every one is refused with a message that names the value (the model's
refusals are INVALID_ARG, never INTERNAL), nothing is answered with replacement characters, a 10 MB prompt is
refused without tokenizing it, and the server keeps serving. The OpenAI door's 65 cases are in test_openai.py;
Triton's HTTP frontend answers some malformed bodies with 500 itself (README, Security: the public HTTP door is
`dgemma openai`, Triton's HTTP is bound to loopback)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from dgemma.serving.client import ServerError, request

from .rawgrpc import send

SORT, SORTED = "sort: 3 1 4 1 5 9 2 6 5 3", "1 1 2 3 3 4 5 5 6 9"


def s(*texts: bytes | str):
    return np.array([[t.encode() if isinstance(t, str) else t for t in texts]], dtype=np.object_)


def v(x, dtype):
    return np.array([[x]], dtype=dtype)


TEXT = s(SORT)
# (name, tensors, pattern the refusal must match)
GRPC = [
    ("missing text_input", {"max_tokens": v(32, np.int32)}, r"text_input"),
    ("empty text_input", {"text_input": s("")}, r"text_input is empty"),
    ("blank text_input", {"text_input": s("   \n")}, r"text_input is empty"),
    ("two prompts", {"text_input": s(SORT, SORT)}, r"text_input|shape|1 value"),
    ("text_input as INT32", {"text_input": v(5, np.int32)}, r"text_input|data ?type|datatype"),
    ("invalid UTF-8 byte", {"text_input": s(b"sort: \xff 1")}, r"text_input is not valid UTF-8"),
    ("UTF-8-encoded surrogate", {"text_input": s(b"sort: \xed\xa0\x80 1")}, r"text_input is not valid UTF-8"),
    ("overlong UTF-8", {"text_input": s(b"sort: \xc0\xaf 1")}, r"text_input is not valid UTF-8"),
    ("truncated UTF-8", {"text_input": s(b"sort: 1 \xe2\x82")}, r"text_input is not valid UTF-8"),
    ("invalid UTF-8 in infill", {"text_input": TEXT, "infill": s(b"1 _ \xff")}, r"infill is not valid UTF-8"),
    ("prompt over max_prompt", {"text_input": s("sort: " + "7 " * 60)}, r"prompt has \d+ tokens; cpu/bf16 holds"),
    ("max_tokens 0", {"text_input": TEXT, "max_tokens": v(0, np.int32)}, r"max_tokens must be an integer >= 1"),
    ("max_tokens negative", {"text_input": TEXT, "max_tokens": v(-5, np.int32)}, r"max_tokens must be"),
    ("max_tokens past the context", {"text_input": TEXT, "max_tokens": v(4096, np.int32)}, r"max_context"),
    ("max_tokens as FP32", {"text_input": TEXT, "max_tokens": v(3.5, np.float32)}, r"max_tokens|data ?type"),
    ("steps 0", {"text_input": TEXT, "max_denoising_steps": v(0, np.int32)}, r"max_denoising_steps must be"),
    ("steps 49", {"text_input": TEXT, "max_denoising_steps": v(49, np.int32)}, r"in 1\.\.48"),
    ("entropy_bound NaN", {"text_input": TEXT, "entropy_bound": v(np.nan, np.float32)}, r"entropy_bound must be a fin"),
    ("entropy_bound inf", {"text_input": TEXT, "entropy_bound": v(np.inf, np.float32)}, r"entropy_bound must be a fin"),
    ("entropy_bound negative", {"text_input": TEXT, "entropy_bound": v(-1, np.float32)}, r"entropy_bound must be"),
    ("temperature NaN", {"text_input": TEXT, "temperature": v(np.nan, np.float32)}, r"temperature"),
    ("temperature 3", {"text_input": TEXT, "temperature": v(3, np.float32)}, r"temperature"),
    ("temperature and its range", {"text_input": TEXT, "temperature": v(0.5, np.float32),
                                   "temperature_max": v(0.9, np.float32)}, r"not both"),
    ("range 0 .. 1e-45", {"text_input": TEXT, "temperature_min": v(0, np.float32),
                          "temperature_max": v(1e-45, np.float32)}, r"temperature_max must be a finite number >= 0\.01"),
    ("range inverted", {"text_input": TEXT, "temperature_min": v(0.9, np.float32),
                        "temperature_max": v(0.5, np.float32)}, r"temperature_min < temperature_max"),
    ("seed as INT64", {"text_input": TEXT, "seed": v(-1, np.int64)}, r"seed|data ?type"),
    ("infill without holes", {"text_input": TEXT, "infill": s("1 2 3")}, r"infill must be a canvas template"),
    ("infill past max_tokens", {"text_input": TEXT, "max_tokens": v(32, np.int32), "infill": s("0 1" + " _" * 40)},
     r"infill template has \d+ tokens, past the 1 canvas"),
    ("17 stop words", {"text_input": TEXT, "stop_words": s(*["x"] * 17)}, r"stop_words"),
    ("a 300-byte stop word", {"text_input": TEXT, "stop_words": s("y" * 300)}, r"each stop word must be 1\.\.256 bytes"),
    ("an empty stop word", {"text_input": TEXT, "stop_words": s("")}, r"each stop word must be 1\.\.256 bytes"),
    ("a stop word of invalid UTF-8", {"text_input": TEXT, "stop_words": s(b"\xff")}, r"not valid UTF-8"),
    ("top_logprobs 6", {"text_input": TEXT, "top_logprobs": v(6, np.int32)}, r"top_logprobs must be an integer in 0"),
    ("top_p 0.5", {"text_input": TEXT, "top_p": v(0.5, np.float32)}, r"top_p=0\.5 is not supported"),
    ("frequency_penalty 1", {"text_input": TEXT, "frequency_penalty": v(1, np.float32)}, r"frequency_penalty"),
    ("unknown input", {"text_input": TEXT, "top_k": v(5, np.int32)}, r"top_k"),
]


@pytest.mark.parametrize("name, tensors, pattern", GRPC, ids=[g[0] for g in GRPC])
def test_grpc_malformed_is_refused_with_the_value(triton, name, tensors, pattern):
    import re

    got = send(triton.grpc_url, tensors)
    assert isinstance(got, str), f"{name}: answered instead of refused"
    assert re.search(pattern, got), got
    assert "internal error" not in got and "Traceback" not in got


def test_huge_prompt_is_refused_before_tokenizing_and_others_are_served(triton):
    """10 MB of text: refused from its byte length alone (the tokenizer would take ~12 s and hold the model); a
    request sent meanwhile is answered as fast as usual."""
    done = {}

    def good():
        t0 = time.perf_counter()
        done["text"] = request(triton.grpc_url, SORT, seed=0)[-1]["text_output"]
        done["s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    th = threading.Thread(target=good)
    th.start()
    got = send(triton.grpc_url, {"text_input": s("7 " * 5_000_000)})
    refused_s = time.perf_counter() - t0
    th.join(60)
    assert isinstance(got, str) and "text_input has 10000000 bytes" in got and "Shorten the prompt" in got
    assert refused_s < 5 and done["text"] == SORTED and done["s"] < 5


HTTP = [
    ("not JSON", b"{"),
    ("JSON array", b"[1, 2]"),
    ("text_input a number", {"text_input": 5}),
    ("max_tokens 0", {"text_input": SORT, "max_tokens": 0}),
    ("max_denoising_steps 100", {"text_input": SORT, "max_denoising_steps": 100}),
    ("text_input empty", {"text_input": ""}),
    ("text_input missing", {"max_tokens": 32}),
    ("max_tokens a string", {"text_input": SORT, "max_tokens": "many"}),
    ("max_tokens negative", {"text_input": SORT, "max_tokens": -1}),
    ("seed negative", {"text_input": SORT, "seed": -1}),
    ("seed 2**64", {"text_input": SORT, "seed": 2**64}),
    ("temperature a string", {"text_input": SORT, "temperature": "hot"}),
    ("entropy_bound zero", {"text_input": SORT, "entropy_bound": 0}),
    ("top_logprobs 9", {"text_input": SORT, "top_logprobs": 9}),
    ("infill without holes", {"text_input": SORT, "infill": "1 2 3"}),
    ("stream true on /generate", {"text_input": SORT, "stream": True}),
]


@pytest.mark.parametrize("name, body", HTTP, ids=[h[0] for h in HTTP])
def test_triton_http_generate_refuses_and_keeps_serving(triton, name, body):
    """Triton's HTTP frontend (loopback only): an error status and no answer; the model's own refusals are 400 with
    its message. Triton's parser answers some bodies with 500 and /generate with stream=true with 200 carrying an
    error (its behaviour, documented; `dgemma openai` is the public door). Fields /generate does not map to inputs
become request parameters, which the model ignores (as Triton's LLM models do), so they are not in this list."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{triton.http_url}/v2/models/dgemma/generate", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    assert "text_output" not in text or "error" in text, (status, text[:300])
    assert status >= 400 or "error" in text, (status, text[:300])
    assert "Traceback" not in text and "internal error in dgemma" not in text
    assert triton.proc.poll() is None


def test_still_serving_after_the_fuzz(triton):
    assert request(triton.grpc_url, SORT, seed=0)[-1]["text_output"] == SORTED
    with pytest.raises(ServerError, match="text_input is empty"):
        request(triton.grpc_url, "")
