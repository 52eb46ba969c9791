"""Inputs shared by the MoE kernel tests: small shapes whose tiles have masked tails, routings with an empty expert or
every token on one expert, and the model's own expert path (the `poisoned` fixture is in conftest)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

# H = 96 with BLOCK_K 64 and I = 40 (48 for NVFP4: 16-blocks) with BLOCK_N 32 / BLOCK_K 32 leave a masked tail in
# every loop; T = 33 and k = 2 give 66 pairs, more than one 16-row tile per expert
E, K_TOP, H, I = 6, 2, 96, 40
TOKENS = (1, 7, 33)
KINDS = ("random", "hot")
EMPTY_EXPERT = E - 1  # no token routes here in either kind
HOT_EXPERT = 2


def routing(t: int, kind: str, seed: int, e: int = E, k: int = K_TOP) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [t,k], idx int64 [t,k]) with distinct experts per token, as top-k gives.
    random: any expert but EMPTY_EXPERT; hot: every token has HOT_EXPERT in a random slot."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(t):
        if kind == "random":
            rows.append(torch.randperm(e - 1, generator=g)[:k])
        else:
            others = torch.tensor([x for x in range(e - 1) if x != HOT_EXPERT])
            row = torch.cat([torch.tensor([HOT_EXPERT]), others[torch.randperm(len(others), generator=g)[:k - 1]]])
            rows.append(row[torch.randperm(k, generator=g)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1) * (0.5 + torch.rand(t, k, generator=g))
    return w.float(), torch.stack(rows).long()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def model_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """model.Experts (impl "grouped") holding the given fp32 weights [E,2I,H], [E,H,I]."""
    from dgemma.model.modeling import Experts

    e, i2, h = w_gate_up.shape
    ex = Experts(SimpleNamespace(num_experts=e, hidden_size=h, moe_intermediate_size=i2 // 2))
    with torch.no_grad():
        ex.gate_up_proj.copy_(w_gate_up)
        ex.down_proj.copy_(w_down)
    return ex


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
