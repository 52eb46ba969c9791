"""On a CUDA GPU: TorchGraphBackend's batch buckets replayed as CUDA graphs answer what the eager unpadded calls
answer (tests/gpu: marked gpu by folder, skipped without a GPU; the padding itself is tested on the CPU in
tests/unit/runtime/test_batch_buckets.py)."""

from __future__ import annotations

import pytest
import torch

from dgemma.model.checkpoint import load_model
from dgemma.runtime.torch_backend import TorchGraphBackend


@pytest.mark.gpu
def test_cuda_graph_per_bucket_matches_eager():
    model = load_model(None, "cuda", "float32").model
    eager = TorchGraphBackend(model, max_context=256, buckets=False)
    graphs = TorchGraphBackend(model, max_context=256)
    assert graphs.buckets and graphs.use_graphs
    g = torch.Generator(device="cuda").manual_seed(0)
    states = [b.new_state(4) for b in (eager, graphs)]
    for row, n in ((0, 9), (1, 30), (3, 17)):
        ids = torch.randint(0, model.cfg.vocab_size, (1, n), device="cuda", generator=g)
        for b, st in zip((eager, graphs), states):
            b.encode(st, ids, rows=[row])
    c = eager.canvas_length
    for _ in range(2):  # the second round replays the graphs captured in the first, with new inputs
        for rows in ([0], [1, 0], [3], [0, 1, 3]):
            canvas = torch.randint(0, model.cfg.vocab_size, (len(rows), c), device="cuda", generator=g)
            soft = torch.randn(len(rows), c, eager.hidden_size, device="cuda", generator=g)
            temp = torch.rand(len(rows), device="cuda", generator=g) + 0.3
            a = eager.denoise(states[0], canvas, soft, temp, rows=rows)
            b = graphs.denoise(states[1], canvas, soft, temp, rows=rows)
            for x, y in zip(a, b):
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert graphs.use_graphs and {k[:2] for k in graphs._graphs} == {("denoiser", 1), ("denoiser", 2),
                                                                     ("denoiser", 4)}
