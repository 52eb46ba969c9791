"""OpenAI-style errors: `ApiError` is what every layer of the HTTP door raises, and the app answers it as
{"error": {"message", "type", "param", "code"}} with its status (and headers such as Retry-After).
`from_triton` maps the `dgemma` model's and Triton's answers onto it: the model reports its refusals as
"<ErrorClass>: message" (triton_repo/dgemma/1/model.py), and a gRPC stream carries only that text."""

from __future__ import annotations

import functools

from ...core.errors import Busy, DgemmaError

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 500: "server_error", 502: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@functools.lru_cache(maxsize=1)
def _model_error_names() -> tuple[frozenset[str], str]:
    """(names of the DgemmaError classes the model answers with INVALID_ARG, the name it answers UNAVAILABLE)."""
    names, todo = set(), [DgemmaError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names - {Busy.__name__}), Busy.__name__


# model input -> the request field it comes from, for the error object's `param`
PARAMS = {"text_input": "prompt", "max_tokens": "max_tokens", "seed": "seed", "stop_words": "stop",
          "temperature": "temperature", "max_denoising_steps": "max_denoising_steps", "entropy_bound": "entropy_bound",
          "infill": "infill", "top_logprobs": "logprobs", "prompt": "prompt"}


def from_triton(message: str, request_id: str) -> ApiError:
    """A stream's error message -> ApiError: the model's request errors 400 (its message), "dgemma is full"
    503 + Retry-After, the model missing 503, anything else 500 with a one-line message (the caller logs it)."""
    invalid, busy = _model_error_names()
    if message.startswith("in ensemble '"):  # the --ensemble rendering prefixes its steps' errors
        message = message.split("', ", 1)[-1]
    name, sep, rest = message.partition(": ")
    if sep and name == busy:
        return ApiError(503, rest, code="model_busy", headers={"Retry-After": "1"})
    if sep and name in invalid:
        first = rest.split(" ", 1)[0]
        return ApiError(400, rest, param=PARAMS.get(first))
    if message.startswith("graph model unavailable"):  # BLS: an encoder/denoiser model is gone (dgemma model.py)
        return ApiError(503, f"the model's graph models are unavailable (request {request_id}); retry shortly.",
                        code="model_not_ready", headers={"Retry-After": "5"})
    if "unknown model" in message or "is not ready" in message:
        return ApiError(503, "the dgemma model is not loaded in Triton; retry once it is ready (GET /health/ready).",
                        code="model_not_ready", headers={"Retry-After": "5"})
    return ApiError(500, f"internal error while generating (request {request_id}); see the server log.",
                    code="internal_error")
