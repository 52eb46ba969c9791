"""Infill templates: a canvas template in text ('_' = one hole token, everything else fixed) -> the id template the
sampler takes ([1, k*C] int64, -1 for holes)."""

from __future__ import annotations

import math

import torch

from ..core.errors import RequestError


def infill_template(tok, text: str, canvas: int, max_new_tokens: int) -> torch.Tensor:
    """'1 _ 3 _' -> [1, k*C] ids with -1 holes: every '_' is one hole token, other text is fixed tokens; the rest of
    the last canvas is holes. k = the canvases max_new_tokens needs (at least the template's)."""
    ids: list[int] = []
    for i, part in enumerate(text.split("_")):
        if i:
            ids.append(-1)
        ids += tok.encode(part) if part else []
    k = max(1, math.ceil(len(ids) / canvas), math.ceil(max_new_tokens / canvas))
    if len(ids) > k * canvas:
        raise RequestError(f"infill template has {len(ids)} tokens; {k} canvas(es) hold {k * canvas}.")
    return torch.tensor([ids + [-1] * (k * canvas - len(ids))], dtype=torch.int64)
