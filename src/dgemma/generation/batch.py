"""In-flight batching: many Generations (one per request, each with its own RNG) sharing one backend state, advanced
together one iteration at a time. Every row is one request; rows join when a slot is free and leave when they
finish, fail or are cancelled, at any step.

Policy of one iteration (`InFlight.step`):
  1. rows that asked to stop (cancelled) leave at once, their slot free for the next admission;
  2. one encoder call per distinct length over the rows that encode: prompts in chunks of `prefill_chunk` tokens
     (a long prompt advances one chunk per iteration, so it never stalls the rows that are denoising for longer
     than one chunk's encoder pass) and the commits of finished canvases (S = canvas length);
  3. one batched denoising step over every row that is denoising, each with its own temperature;
  4. each row's sampler step runs on its own slice of the logits with its own generator, so its tokens are those
     it would get alone (given a backend whose rows do not depend on each other: ORT, the static torch passes).
The backend must take `rows=` in encode/denoise and `reset_rows` (dgemma.runtime.graph_backend.GraphBackend).
Knows nothing of Triton, tokenizers or requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .sampler import Generation, StepEvent


@dataclass
class Row:
    gen: Generation
    prompt: Tensor  # [1, L]
    on_step: Callable[[StepEvent], None] | None = None
    on_canvas: Callable[[int, Tensor], None] | None = None
    should_stop: Callable[[], bool] | None = None
    slot: int = -1
    prefilled: int = 0  # prompt tokens encoded so far
    tag: Any = None  # the caller's handle (a request)


@dataclass
class StepReport:
    """What one iteration did: encoder calls (rows, tokens, seconds), the denoising call (rows, seconds), and the
    rows that left (finished, cancelled, failed with their exception)."""

    encoded: list[tuple[int, int, float]] = field(default_factory=list)
    denoised: tuple[int, float] | None = None
    finished: list[Row] = field(default_factory=list)
    cancelled: list[Row] = field(default_factory=list)
    failed: list[tuple[Row, BaseException]] = field(default_factory=list)


class InFlight:
    def __init__(self, backend, rows: int, prefill_chunk: int):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
        self.backend, self.capacity, self.prefill_chunk = backend, rows, prefill_chunk
        self.state = backend.new_state(rows)
        self.rows: list[Row] = []
        self._free = list(range(rows))

    @property
    def free(self) -> int:
        return len(self._free)

    def add(self, row: Row) -> Row:
        """Take a free slot (the caller checks `free`); the row starts with its prompt's prefill."""
        row.slot = self._free.pop(0)
        self.backend.reset_rows(self.state, [row.slot])
        self.rows.append(row)
        return row

    def leave(self, row: Row) -> None:
        """The row is gone (finished, failed or cancelled): its slot is free."""
        self.rows.remove(row)
        self._free.append(row.slot)
        self._free.sort()

    @torch.no_grad()
    def step(self) -> StepReport:
        rep = StepReport()
        for row in list(self.rows):
            try:
                stop = row.should_stop is not None and row.should_stop()
            except Exception as e:  # noqa: BLE001 - the caller's hook failed: that row fails, the others go on
                self._fail(rep, [row], e)
                continue
            if stop:
                self.leave(row)
                rep.cancelled.append(row)
        self._encode(rep)
        self._denoise(rep)
        return rep

    def _fail(self, rep: StepReport, rows: list[Row], e: BaseException) -> None:
        for row in rows:
            if row in self.rows:
                self.leave(row)
                rep.failed.append((row, e))

    def _encode(self, rep: StepReport) -> None:
        groups: dict[int, list[tuple[Row, Tensor]]] = {}
        for row in self.rows:
            if row.gen.phase != "encode":
                continue
            ids = row.gen.encode_ids()
            if row.gen.ci == 0:  # the prompt, in chunks
                ids = ids[:, row.prefilled : row.prefilled + self.prefill_chunk]
            groups.setdefault(ids.shape[1], []).append((row, ids))
        for s, members in sorted(groups.items()):
            rows = [r for r, _ in members]
            t0 = time.perf_counter()
            try:
                self.backend.encode(self.state, torch.cat([ids for _, ids in members]), rows=[r.slot for r in rows])
            except Exception as e:  # noqa: BLE001 - every row of a failed call fails; the scheduler goes on
                self._fail(rep, rows, e)
                continue
            rep.encoded.append((len(rows), s, time.perf_counter() - t0))
            for row in rows:
                if row.gen.ci == 0:
                    row.prefilled += s
                    if row.prefilled < row.prompt.shape[1]:
                        continue
                try:
                    row.gen.encoded()
                except Exception as e:  # noqa: BLE001
                    self._fail(rep, [row], e)

    def _denoise(self, rep: StepReport) -> None:
        rows = [r for r in self.rows if r.gen.phase == "denoise"]
        if not rows:
            return
        inputs = [r.gen.denoise_inputs() for r in rows]
        canvas = torch.cat([c for c, _, _ in inputs])
        softs = [s for _, s, _ in inputs]
        soft = None
        if any(s is not None for s in softs):
            like = next(s for s in softs if s is not None)
            soft = torch.cat([s if s is not None else torch.zeros_like(like) for s in softs])
        temps = torch.stack([t.reshape(()) for _, _, t in inputs])
        t0 = time.perf_counter()
        try:
            raw, nxt = self.backend.denoise(self.state, canvas, soft, temps, rows=[r.slot for r in rows])
        except Exception as e:  # noqa: BLE001
            self._fail(rep, rows, e)
            return
        rep.denoised = (len(rows), time.perf_counter() - t0)
        for i, row in enumerate(rows):
            try:
                ev = row.gen.denoised(raw[i : i + 1], nxt[i : i + 1])
                if row.on_step is not None:
                    row.on_step(ev)
                if ev.committed is not None and row.on_canvas is not None:
                    row.on_canvas(ev.canvas, ev.committed)
            except Exception as e:  # noqa: BLE001 - this row's sampler or callback failed; the others go on
                self._fail(rep, [row], e)
                continue
            if row.gen.phase == "done":
                self.leave(row)
                rep.finished.append(row)
