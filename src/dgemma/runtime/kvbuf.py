"""Fixed-capacity KV buffers of the graph contract (dgemma.core.contract, v2), for numpy and torch alike.

Owns the buffer shapes for a batch and capacity, and `append`: writing the encoder's new K/V (`new_key_i`,
`new_value_i` [B, kvh, S, hd]) into the buffers at each row's own length. Full layers write slots P..P+S-1;
sliding layers keep the last min(P+S, W-1) tokens in order at the front. Used by every runtime that drives the
graphs (ONNX Runtime, TensorRT, the Triton BLS loop), so the layout is implemented once. Knows nothing of
sampling, ONNX or Triton.
"""

from __future__ import annotations

from typing import Sequence

from ..core import contract
from ..core.config import ModelConfig
from ..core.errors import RequestError


def shapes(cfg: ModelConfig, batch: int, capacity: int) -> list[tuple[int, ...]]:
    """Shapes of past_key_0, past_value_0, ... for `batch` rows and `capacity` slots in full layers."""
    return [tuple(batch if d == contract.BATCH else capacity if d == contract.KV_CAPACITY else d for d in t.dims)
            for t in contract.past(cfg)]


def _copy(x):
    return x.clone() if hasattr(x, "clone") else x.copy()


def append(cfg: ModelConfig, buffers: Sequence, new: Sequence, lengths: Sequence[int],
           rows: Sequence[int] | None = None) -> list[int]:
    """Write new K/V (contract order) into `buffers` in place at each row's length; returns the new lengths.

    buffers[j]: [R, kvh, cap, hd] (cap = W-1 for sliding layers); new[j]: [B, kvh, S, hd]; lengths: P per new row;
    rows: the buffer row of each new row (default 0..B-1). Raises RequestError when a full-layer buffer would
    overflow (P + S > capacity).
    """
    keep = cfg.sliding_cache_len
    s = int(new[0].shape[2])
    out = []
    for i, p in enumerate(int(x) for x in lengths):
        b = i if rows is None else int(rows[i])
        for j, (buf, full) in enumerate(zip(buffers, new)):
            nw = full[i]
            if cfg.is_sliding(j // 2):
                valid = min(p, keep)
                n_new = min(s, keep)
                n_old = min(valid, keep - n_new)
                if n_old and n_old != valid:  # shift the kept old tokens to the front
                    buf[b, :, :n_old] = _copy(buf[b, :, valid - n_old:valid])
                buf[b, :, n_old:n_old + n_new] = nw[:, s - n_new:]
            else:
                cap = int(buf.shape[2])
                if p + s > cap:
                    raise RequestError(f"KV buffer holds {cap} tokens; row {b} has {p} cached + {s} new = {p + s}. "
                                       "Lower max_new_tokens or the prompt length, or raise max_context.")
                buf[b, :, p:p + s] = nw
        out.append(p + s)
    return out


def valid(cfg: ModelConfig, layer: int, length: int) -> int:
    """How many leading slots of layer `layer`'s buffer are valid after `length` cached tokens."""
    return min(length, cfg.sliding_cache_len) if cfg.is_sliding(layer) else length
