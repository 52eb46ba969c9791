"""The backend protocol: the two passes the canvas sampler needs, and nothing else.

A backend owns the weights and the KV state of one batch of sequences. Torch, ONNX Runtime,
TensorRT and Triton backends implement it; the sampler (dgemma.sampler) drives any of them and
knows nothing of how they compute. Backends know nothing of sampling.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    vocab_size: int
    canvas_length: int
    device: torch.device
    max_context: int  # prompt + generated tokens the KV state can hold

    def new_state(self, batch: int) -> Any:
        """Empty KV state for `batch` sequences (length 0)."""

    def encode(self, state: Any, ids: Tensor) -> None:
        """Causal pass over ids [B,S] int64 at positions [P, P+S); appends their K/V; P += S."""

    def denoise(self, state: Any, canvas: Tensor, soft: Tensor | None, temperature: Tensor) -> tuple[Tensor, Tensor]:
        """One denoising step at positions [P, P+C); the state is read only.

        canvas [B,C] int64; soft [B,C,H] self-conditioning embeddings of the previous step (None on the
        first step of a canvas); temperature: 0-d fp32 tensor of this step.
        Returns raw logits [B,C,V] fp32 and the next soft embeddings [B,C,H] computed from
        bf16(raw / temperature), so V-sized tensors need not leave an engine that fuses it.
        """

    def length(self, state: Any) -> int:
        """P: tokens already encoded into the state."""


class BackendWrapper:
    """Forwards the Backend protocol to `inner`; subclasses override only the calls they observe
    (timing traces, recording, clocks)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        for k in ("vocab_size", "canvas_length", "device", "max_context"):
            setattr(self, k, getattr(inner, k))

    def new_state(self, batch: int) -> Any:
        return self.inner.new_state(batch)

    def length(self, state: Any) -> int:
        return self.inner.length(state)

    def encode(self, state: Any, ids: Tensor) -> None:
        self.inner.encode(state, ids)

    def denoise(self, state: Any, canvas: Tensor, soft: Tensor | None, temperature: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner.denoise(state, canvas, soft, temperature)


class Observed(BackendWrapper):
    """`inner`, reporting the wall time of every call: on_call(kind, t0, t1) with kind "encode" or "denoise" and
    perf_counter seconds. sync=True synchronises a CUDA device before both clock reads, so the times are the
    device's (benchmarks); False leaves the asynchronous timing of what the host sees (serving metrics)."""

    def __init__(self, inner: Backend, on_call: Callable[[str, float, float], None], sync: bool = False):
        super().__init__(inner)
        self.on_call = on_call
        self.sync = sync and self.device.type == "cuda"

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def encode(self, state: Any, ids: Tensor) -> None:
        t0 = self.now()
        self.inner.encode(state, ids)
        self.on_call("encode", t0, self.now())

    def denoise(self, state: Any, canvas: Tensor, soft: Tensor | None, temperature: Tensor) -> tuple[Tensor, Tensor]:
        t0 = self.now()
        out = self.inner.denoise(state, canvas, soft, temperature)
        self.on_call("denoise", t0, self.now())
        return out
