"""Hostile input, before any parsing: the request body is read with a byte cap (Content-Length checked first,
then counted while streaming) and a time limit, its JSON nesting depth is measured by a C-speed scan
(regular expressions + numpy) before `json.loads` sees it, and the parser refuses NaN/Infinity, numbers
beyond float range and integers with more than 19 digits. Everything wrong is an ApiError 4xx."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np

from .errors import ApiError, bad_request

MAX_BODY_BYTES = 1 << 20  # default --max-body-bytes: 1 MiB holds any prompt a served profile accepts
MAX_DEPTH = 32  # chat bodies need 4 levels (body > messages > message > content part); Triton's HTTP parser
#                 crashes on 100,000 (README, Security)
BODY_TIMEOUT_S = 30.0  # a client trickling its body holds a connection; beyond this it gets 408
MAX_INT_DIGITS = 19  # seeds go up to 2**63 - 1 (19 digits); larger integers are refused before int() runs



async def read_body(receive, headers: dict[str, str], max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body from ASGI `receive`, refusing more than max_bytes (413) as early as possible."""
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad_request(f"Content-Length must be a decimal byte count (got {length[:32]!r}).")
        if int(length) > max_bytes:
            raise _too_large(int(length), max_bytes)

    async def collect() -> bytes:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client disconnected while sending the body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(size, max_bytes)
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:.0f} s.") from None


def _too_large(size: int, max_bytes: int) -> ApiError:
    return ApiError(413, f"request body is {'at least ' if size > max_bytes else ''}{size} bytes; this server "
                         f"accepts at most {max_bytes} (--max-body-bytes).", code="body_too_large")


def check_content_type(value: str | None) -> None:
    mime, _, params = (value or "").partition(";")
    if mime.strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json (got {value!r}).", code="unsupported_media_type")
    charset = re.search(r"charset\s*=\s*\"?([\w-]+)", params, re.I)
    if charset and charset.group(1).lower() not in ("utf-8", "utf8"):
        raise ApiError(415, f"the body must be UTF-8 JSON (Content-Type names charset {charset.group(1)!r}).",
                       code="unsupported_media_type")


def nesting_depth(body: bytes) -> int:
    """Deepest [ / { nesting outside strings. Escaped backslashes and quotes go first, then every other piece
    between quotes (a string), so brackets inside strings never count; all in C (bytes.replace/split, numpy).
    On malformed JSON the figure may be off, and json.loads refuses such a body anyway."""
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[0::2])
    a = np.frombuffer(outside, dtype=np.uint8)
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int32) - ((a == 0x5D) | (a == 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def _constant(name: str):
    raise bad_request(f"{name} is not a JSON number; send finite numbers only.")


def _int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise bad_request(f"integer {s[:24]}{'...' if len(s) > 24 else ''} has {len(s.lstrip('-'))} digits; at "
                          f"most {MAX_INT_DIGITS} are accepted.")
    return int(s)


def _float(s: str) -> float:
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise bad_request(f"number {s[:24]} is beyond the float range.")
    return v


def parse_json(body: bytes, max_depth: int = MAX_DEPTH) -> dict:
    """A JSON object from body bytes, or ApiError 400 naming what is wrong."""
    depth = nesting_depth(body)
    if depth > max_depth:
        raise bad_request(f"JSON nesting is {depth} levels deep; at most {max_depth} are accepted.",
                          code="nesting_too_deep")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the body is not valid UTF-8 (byte {e.start}).") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float)
    except json.JSONDecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.") from None
    except RecursionError:  # not reached after the depth check; kept so no parser path can become a 500
        raise bad_request("JSON nesting is too deep.", code="nesting_too_deep") from None
    if not isinstance(value, dict):
        raise bad_request(f"the body must be a JSON object (got {type(value).__name__}).")
    return value
