"""Backend over the two graphs of the IO contract with torch tensors, whatever executes them.

Owns `GraphBackend`: the fixed-capacity KV state (torch buffers on the backend's device, per-row lengths,
appended with dgemma.runtime.kvbuf), the feeds both graphs share (position_ids, past_length, the buffers) and
the Backend protocol on top of one abstract call, `_run(graph, feed) -> outputs in contract order`.
OrtBackend runs the feeds through ONNX Runtime, TrtBackend through TensorRT engines, BlsBackend through Triton
BLS requests. Knows nothing of sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core import contract
from ..core.config import ModelConfig
from ..core.errors import RequestError
from . import kvbuf

DTYPES = {"int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GraphState:
    batch: int
    lengths: list[int] = field(default_factory=list)  # cached tokens per row
    kv: list[Tensor] = field(default_factory=list)  # past_key_0, past_value_0, ... buffers in contract order


class GraphBackend:
    """Subclasses set cfg, precision, device, max_context (then call _setup()) and implement _run."""

    cfg: ModelConfig
    precision: str
    device: torch.device
    max_context: int
    limit_source: str = "the KV buffers' capacity"  # named in the context-overflow message

    def _setup(self) -> None:
        self.vocab_size, self.canvas_length = self.cfg.vocab_size, self.cfg.canvas_length
        self.hidden_size = self.cfg.hidden_size
        self._kv_dtype = DTYPES[contract.kv_dtype(self.precision)]

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        raise NotImplementedError

    # -- Backend protocol ---------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> GraphState:
        kv = [torch.zeros(s, dtype=self._kv_dtype, device=self.device)
              for s in kvbuf.shapes(self.cfg, batch, self.max_context)]
        return GraphState(batch, [0] * batch, kv)

    def length(self, state: GraphState) -> int:
        return state.lengths[0]

    # Rows: a state holds `batch` rows; encode/denoise take `rows` (indices into the state, default all) so the
    # serving scheduler can run any subset of its requests in one graph call. A contiguous run of rows is passed
    # to the graph as views of the buffers; any other subset is gathered (and the encoder's new K/V scattered
    # back). Each row keeps its own length, so rows at different positions share a call (contract v2).
    def reset_rows(self, state: GraphState, rows: list[int]) -> None:
        """Rows become empty (length 0); their buffer contents are masked out from then on."""
        for r in rows:
            state.lengths[r] = 0

    @staticmethod
    def _lengths(state: GraphState, rows: list[int] | None) -> list[int]:
        return list(state.lengths) if rows is None else [state.lengths[r] for r in rows]

    def _call(self, graph: str, state: GraphState, rows: list[int] | None, feed: dict[str, Tensor]) -> list[Tensor]:
        """One graph call over `rows` of the state: feed (the call's own inputs, [n, S, ...]) plus the shared ones."""
        lengths, kv = self._rows(state, rows)
        n = next(iter(feed.values())).shape[1]
        return self._run(graph, {**feed, **self._common(lengths, kv, n)})

    def _rows(self, state: GraphState, rows: list[int] | None) -> tuple[list[int], list[Tensor]]:
        if rows is None:
            return list(state.lengths), state.kv
        rows = list(rows)
        lengths = [state.lengths[r] for r in rows]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return lengths, [a[rows[0]:rows[0] + len(rows)] for a in state.kv]
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return lengths, [a.index_select(0, idx) for a in state.kv]

    def _check_room(self, state: GraphState, lengths: list[int], n_rows: int, ids: Tensor) -> None:
        if ids.shape[0] != n_rows:
            raise RequestError(f"batch of {ids.shape[0]} rows, but {n_rows} state rows were given.")
        if max(lengths) + ids.shape[1] > self.max_context:
            raise RequestError(f"context of {max(lengths) + ids.shape[1]} tokens exceeds max_context="
                               f"{self.max_context} ({self.limit_source}; {max(lengths)} cached + "
                               f"{ids.shape[1]} new). Shorten the prompt, lower max_new_tokens, or raise max_context.")

    def _common(self, lengths: list[int], kv: list[Tensor], n: int) -> dict[str, Tensor]:
        lengths = torch.tensor(lengths, dtype=torch.int64, device=self.device)
        pos = lengths[:, None] + torch.arange(n, device=self.device)[None, :]
        names = [t.name for t in contract.past(self.cfg, self.precision)]
        return {"position_ids": pos, contract.PAST_LENGTH: lengths, **dict(zip(names, kv))}

    @torch.no_grad()
    def encode(self, state: GraphState, ids: Tensor, rows: list[int] | None = None) -> None:
        lengths = self._lengths(state, rows)
        self._check_room(state, lengths, len(lengths), ids)
        new = self._call(contract.ENCODER, state, rows, {"input_ids": ids})
        targets = list(range(state.batch)) if rows is None else list(rows)
        for r, n in zip(targets, kvbuf.append(self.cfg, state.kv, new, lengths, targets)):
            state.lengths[r] = n

    @torch.no_grad()
    def denoise(self, state: GraphState, canvas: Tensor, soft: Tensor | None, temperature: Tensor,
                rows: list[int] | None = None):
        """temperature: 0-d (every row) or [n] (one per row)."""
        lengths = self._lengths(state, rows)
        self._check_room(state, lengths, len(lengths), canvas)
        b, c = canvas.shape
        sc = torch.zeros(b, c, self.hidden_size, device=self.device) if soft is None else soft
        temp = temperature.to(self.device, torch.float32).reshape(-1).expand(b)
        logits, nxt = self._call(contract.DENOISER, state, rows, {"canvas_ids": canvas, "sc_embeds": sc,
                                                                 "temperature": temp})
        return logits, nxt

    # -- for tests/inspection -----------------------------------------------------------------------------------
    def kv_tensors(self, state: GraphState) -> list[Tensor]:
        """The valid prefix of every K/V buffer (rows share one length here)."""
        n = state.lengths[0]
        return [a[:, :, :kvbuf.valid(self.cfg, j // 2, n)] for j, a in enumerate(state.kv)]
