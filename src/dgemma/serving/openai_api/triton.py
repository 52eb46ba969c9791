"""The bridge to Triton's gRPC endpoint: one grpc.aio channel for the server's lifetime, one bidirectional
ModelStreamInfer stream per HTTP request, cancelled when the caller stops listening (the model then frees its
slot: canvas_loop polls the cancellation before every denoising step).

It drives tritonclient's generated gRPC stub rather than `tritonclient.grpc.aio.InferenceServerClient.
stream_infer`, because that method cannot ask for the flags-only final response (it refuses the reserved
`triton_enable_empty_final_response` parameter), and without it a decoupled model's end of answer is
invisible. Inputs are typed from the model's own metadata, so the inputs the model gained after this
code was written (or lacks, in an older repository) need no table here."""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from .errors import ApiError, from_triton

log = logging.getLogger("dgemma.openai")

NUMPY = {"BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "UINT32": np.uint32, "UINT64": np.uint64,
         "FP32": np.float32, "FP64": np.float64}


@dataclass
class ModelInfo:
    """What the served model declares: inputs (name -> datatype) and its config `parameters` (strings)."""

    name: str
    inputs: dict[str, str]
    params: dict[str, str]

    def param(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)


@dataclass
class Event:
    """One model response, decoded: the committed text of canvas `canvas_index` (or a draft of it) and, where
    the model returns them, its tokens, their log-probabilities, token counts and the finish reason."""

    text: str
    canvas_index: int = 0
    canvases: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    tokens_per_forward: float = 0.0
    draft: bool = False
    token_ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def committed(self) -> bool:
        """A committed canvas (not a draft, not the closing statistics response of a stream)."""
        return not self.draft and self.canvas_index < self.canvases


def _bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode("utf-8") for v in values))


class TritonBridge:
    def __init__(self, url: str, model: str = "dgemma"):
        self.url, self.model = url, model
        self._channel = None
        self._stub = None
        self.info: ModelInfo | None = None

    def _open(self):
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            # same message limits as tritonclient's own channels
            self._channel = grpc.aio.insecure_channel(self.url, options=[
                ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)])
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def ready(self, timeout_s: float = 2.0) -> bool:
        """Triton up and the dgemma model ready."""
        import grpc
        from tritonclient.grpc import service_pb2 as pb

        stub = self._open()
        try:
            server = await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s)
            model = await stub.ModelReady(pb.ModelReadyRequest(name=self.model), timeout=timeout_s)
            return bool(server.ready and model.ready)
        except grpc.aio.AioRpcError:
            return False

    async def load_info(self, timeout_s: float = 10.0) -> ModelInfo:
        from tritonclient.grpc import service_pb2 as pb

        stub = self._open()
        md = await stub.ModelMetadata(pb.ModelMetadataRequest(name=self.model), timeout=timeout_s)
        cfg = await stub.ModelConfig(pb.ModelConfigRequest(name=self.model), timeout=timeout_s)
        self.info = ModelInfo(self.model, {i.name: i.datatype for i in md.inputs},
                              {k: v.string_value for k, v in cfg.config.parameters.items()})
        return self.info

    def _request(self, text: str, inputs: dict[str, Any], request_id: str):
        from tritonclient.grpc import service_pb2 as pb

        req = pb.ModelInferRequest(model_name=self.model, id=request_id)
        req.parameters["triton_enable_empty_final_response"].bool_param = True
        for name, value in {"text_input": text, **inputs}.items():
            dtype = self.info.inputs[name]
            t = req.inputs.add()
            t.name, t.datatype = name, dtype
            # the dgemma model has max_batch_size 1: a leading batch dim of 1 ([1, 1], or [1, n] for a list)
            if dtype == "BYTES":
                values = value if isinstance(value, list) else [value]
                t.shape.extend([1, len(values)])
                req.raw_input_contents.append(_bytes_tensor(values))
            else:
                t.shape.extend([1, 1])
                req.raw_input_contents.append(np.array([value], dtype=NUMPY[dtype]).tobytes())
        return req

    async def generate(self, text: str, inputs: dict[str, Any], request_id: str) -> AsyncIterator[Event]:
        """The model's responses for one request, in order; raises ApiError for an error response or a failed
        stream. Closing (or cancelling) the iterator before the end cancels the gRPC stream."""
        import grpc

        stub = self._open()
        request = self._request(text, inputs, request_id)
        sent_all = asyncio.Event()

        async def requests():
            yield request
            await sent_all.wait()  # half-closing early would be legal, but keeping it open is what Triton tests

        call = stub.ModelStreamInfer(requests())
        try:
            async for resp in call:
                if resp.error_message:
                    err = from_triton(resp.error_message, request_id)
                    if err.status >= 500:
                        log.error("request %s: Triton answered: %s", request_id, resp.error_message)
                    raise err
                ir = resp.infer_response
                if ir.outputs:
                    yield _decode(ir)
                if ir.parameters["triton_final_response"].bool_param:
                    return
            raise ApiError(502, "Triton closed the stream before the final response.", code="upstream_closed")
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ApiError(503, f"Triton at {self.url} is unavailable ({e.code().name}); retry later.",
                               code="upstream_unavailable", headers={"Retry-After": "5"}) from None
            log.error("request %s: gRPC stream failed: %s %s", request_id, e.code(), e.details())
            raise ApiError(500, f"internal error talking to Triton (request {request_id}); see the server log.",
                           code="internal_error") from None
        finally:
            sent_all.set()
            call.cancel()  # no-op after the final response; otherwise Triton cancels the request


def _decode(ir) -> Event:
    from tritonclient.grpc import InferResult

    r = InferResult(ir)
    names = {o.name for o in ir.outputs}

    def get(name):
        return r.as_numpy(name) if name in names else None

    def scalar(name, cast):
        a = get(name)
        return None if a is None else cast(a.reshape(-1)[0])

    text = get("text_output")
    fr = scalar("finish_reason", lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b))
    return Event(
        text="" if text is None else text.reshape(-1)[0].decode("utf-8", errors="replace"),
        canvas_index=scalar("canvas_index", int) or 0, canvases=scalar("canvases", int) or 0,
        steps_per_canvas=[] if get("steps_per_canvas") is None else get("steps_per_canvas").reshape(-1).tolist(),
        tokens_per_forward=scalar("tokens_per_forward", float) or 0.0, draft=bool(scalar("is_draft", bool)),
        token_ids=get("output_token_ids"), logprobs=get("output_logprobs"), top_ids=get("output_top_logprob_ids"),
        top_logprobs=get("output_top_logprobs"), num_input_tokens=scalar("num_input_tokens", int),
        num_output_tokens=scalar("num_output_tokens", int), finish_reason=fr)
