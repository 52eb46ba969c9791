"""TorchGraphBackend's batch buckets: calls padded to a fixed row count answer exactly what the unpadded calls do.

On CUDA the bucketed calls are captured as CUDA graphs (one per graph and bucket); here, on the CPU, the same
padding runs eagerly, which checks everything but the capture: the bucket chosen, the padding rows' inputs, the
outputs taken back for the real rows and the K/V written only for them.
"""

from __future__ import annotations

import pytest
import torch

from dgemma.core import contract
from dgemma.model.checkpoint import load_model
from dgemma.runtime.torch_backend import TorchGraphBackend


@pytest.fixture(scope="module")
def backends():
    torch.set_num_threads(1)
    model = load_model(None, "cpu", "float32").model
    return (TorchGraphBackend(model, max_context=256, buckets=False),
            TorchGraphBackend(model, max_context=256, buckets=True), model)


@pytest.mark.parametrize("batch, sizes", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]),
                                          (8, [1, 2, 4, 8]), (16, [1, 2, 4, 8, 16])])
def test_bucket_sizes_are_powers_of_two_up_to_the_batch(batch, sizes):
    assert TorchGraphBackend.bucket_sizes(batch) == sizes


def test_buckets_and_graphs_default_off_on_the_cpu(backends):
    default = TorchGraphBackend(backends[2], max_context=256)
    assert (default.buckets, default.use_graphs) == (False, False)
    assert TorchGraphBackend(backends[2], max_context=256, buckets=True).use_graphs is False  # no CUDA graphs here


def _prefilled(b: TorchGraphBackend, lengths: dict[int, int], batch: int = 6):
    st = b.new_state(batch)
    g = torch.Generator().manual_seed(1)
    for row, n in lengths.items():
        b.encode(st, torch.randint(0, b.vocab_size, (1, n), generator=g), rows=[row])
    return st


def test_padded_calls_equal_unpadded_ones_bit_for_bit(backends):
    plain, bucketed, _ = backends
    lengths = {0: 9, 1: 17, 3: 40}  # rows 2, 4, 5 empty (free slots)
    s0, s1 = _prefilled(plain, lengths), _prefilled(bucketed, lengths)
    seen: list[tuple[str, int]] = []
    run = bucketed._run
    bucketed._run = lambda graph, feed: seen.append((graph, feed["position_ids"].shape[0])) or run(graph, feed)
    try:
        g = torch.Generator().manual_seed(2)
        c = plain.canvas_length
        for rows, want in (([3], 4), ([0, 3], 4), ([1], 2), ([1, 0], 2), ([0, 1, 3], 4), (None, 6)):
            n = 6 if rows is None else len(rows)
            canvas = torch.randint(0, plain.vocab_size, (n, c), generator=g)
            soft = torch.randn(n, c, plain.hidden_size, generator=g)
            temp = torch.rand(n, generator=g) + 0.3
            seen.clear()
            a = plain.denoise(s0, canvas, soft, temp, rows=rows)
            b = bucketed.denoise(s1, canvas, soft, temp, rows=rows)
            assert seen == [(contract.DENOISER, want)], rows
            assert all(torch.equal(x, y) for x, y in zip(a, b)), rows
            assert all(torch.isfinite(y).all() for y in b)
        # a commit (one canvas through the encoder) into rows 3 and 0: bucket 4; rows 1, 2 (padding) untouched
        ids = torch.randint(0, plain.vocab_size, (2, c), generator=g)
        seen.clear()
        plain.encode(s0, ids, rows=[3, 0])
        bucketed.encode(s1, ids, rows=[3, 0])
        assert seen == [(contract.ENCODER, 4)]
        assert s1.lengths == s0.lengths == [9 + c, 17, 0, 40 + c, 0, 0]
        assert all(torch.equal(x, y) for x, y in zip(s0.kv, s1.kv))
        # a prompt chunk is not a canvas: it runs unpadded
        seen.clear()
        bucketed.encode(s1, ids[:1, :5], rows=[2])
        assert seen == [(contract.ENCODER, 1)]
    finally:
        del bucketed._run
