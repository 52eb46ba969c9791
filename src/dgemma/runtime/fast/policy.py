"""Which fused Triton kernels (dgemma.kernels) the fast backend uses, op by op, and how each falls back.

Ops: `moe` (routed experts: kernels.moe.fp8_moe / kernels.moe_w4a16.w4a16_moe), `attention` (kernels.attention),
`dense` (the whole layer pass of runtime.fast.fused: norm+QKV, o-proj, post-attention, dense MLP, post-FFN) and
`head` (kernels.fused_sampler, only for the fused-sampler generate of dgemma.generation.fused). Modes: "auto" = on
for a CUDA device when triton imports; "off"; "force" = on everywhere (CPU tensors then run under the Triton
interpreter: how the CPU tests exercise them). An op whose kernel raises is switched off with a note in "auto" and
re-raises in "force"; `summary()` says what runs and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...core.errors import ConfigError

try:  # the optional `kernels` extra (triton); without it every op runs its torch path
    from ...kernels import attention as k_attention
    from ...kernels import fp8_gemm as k_gemm
    from ...kernels import fused_sampler as k_sampler
    from ...kernels import moe as k_moe
    from ...kernels import moe_w4a16 as k_w4a16
    from ...kernels import norm_quant as k_norm
    from ...kernels import qkv as k_qkv
    from ...kernels import residual_norm as k_resnorm
    from ...kernels.numerics import interpreting
    IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - environments without triton
    k_attention = k_gemm = k_sampler = k_moe = k_w4a16 = k_norm = k_qkv = k_resnorm = None
    IMPORT_ERROR = e

    def interpreting() -> bool:
        return False

_NOTES: set[str] = set()


def note(msg: str) -> None:
    """Print a degradation note once per process."""
    if msg not in _NOTES:
        _NOTES.add(msg)
        print(f"[dgemma.fast] {msg}", flush=True)


OPS = ("moe", "attention", "dense", "head")
MODES = ("auto", "off", "force")


@dataclass
class Kernels:
    """The per-op switch one FastBackend (and the expert modules it owns) consults."""

    mode: str = "off"
    enabled: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(OPS, False))
    why: dict[str, str] = field(default_factory=dict)  # op -> why it is off (or "" when on)

    @classmethod
    def resolve(cls, mode: str, device: torch.device) -> "Kernels":
        if mode not in MODES:
            raise ConfigError(f"kernels={mode!r}; valid: {', '.join(MODES)}.")
        k = cls(mode)
        if mode == "off":
            reason = "kernels='off'"
        elif IMPORT_ERROR is not None:
            if mode == "force":
                raise ConfigError(f"kernels='force' needs triton (pip install 'dgemma[kernels]'): {IMPORT_ERROR}")
            reason = f"triton is not importable ({IMPORT_ERROR})"
        elif device.type != "cuda" and mode == "auto":
            reason = f"device {device.type}: the kernels are compiled for CUDA (kernels='force' interprets them)"
        elif device.type != "cuda" and not interpreting():
            raise ConfigError("kernels='force' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                              "before triton is imported (the dgemma CLI does so when no CUDA device is visible).")
        else:
            reason = ""
        for op in OPS:
            k.enabled[op], k.why[op] = not reason, reason
        return k

    def use(self, op: str) -> bool:
        return self.enabled[op]

    def disable(self, op: str, reason: str) -> None:
        self.enabled[op], self.why[op] = False, reason

    def run(self, op: str, kernel: Callable, fallback: Callable):
        """kernel() if `op` is on, else fallback(); a kernel that raises turns the op off (auto) or re-raises."""
        if not self.enabled[op]:
            return fallback()
        try:
            return kernel()
        except Exception as e:  # noqa: BLE001 - any failure of a kernel means "use the torch path"
            if self.mode == "force":
                raise
            note(f"kernel op {op!r} failed ({type(e).__name__}: {e}); running its torch path from now on")
            self.disable(op, f"failed: {type(e).__name__}: {e}")
            return fallback()

    def summary(self) -> dict:
        return {"mode": self.mode, **{op: "on" if self.enabled[op] else f"off ({self.why.get(op, '')})"
                                      for op in OPS}}


OFF = Kernels()  # what an expert module outside a FastBackend consults
