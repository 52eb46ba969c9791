"""ONNX Runtime graphs vs the native torch model (fp32): KV and logits within 1e-5 relative (max|d| / max|ref|);
the sampler on ORT checked by replaying the torch logits stream (spec §11), not by end-to-end token equality."""

from __future__ import annotations

import pytest
import torch

from dgemma.runtime.base import BackendWrapper
from dgemma.runtime.ort_backend import OrtBackend
from dgemma.runtime.torch_backend import TorchBackend
from dgemma.generation.sampler import generate
from dgemma.tiny import tiny_sampler

TOL = 1e-5


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def backends(onnx_dir, tiny_model, tiny_dir):
    return OrtBackend(onnx_dir, checkpoint=tiny_dir, cfg=tiny_model.cfg), TorchBackend(tiny_model)


def _check_kv(ob, so, tb, st):
    kv = ob.kv_tensors(so)
    for i in range(tb.model.cfg.num_hidden_layers):
        k, v = st.prefix(i)
        assert kv[2 * i].shape == k.shape and kv[2 * i + 1].shape == v.shape
        assert rel(kv[2 * i], k) < TOL and rel(kv[2 * i + 1], v) < TOL


# prompts shorter (10) and longer (40) than the sliding window (16); batch 1 and 2 (export used B=2, S=3)
@pytest.mark.parametrize("batch,prompt_len", [(1, 10), (2, 40), (2, 10), (1, 40)])
def test_ort_matches_torch(backends, batch, prompt_len):
    ob, tb = backends
    g = torch.Generator().manual_seed(batch * 100 + prompt_len)
    ids = torch.randint(0, ob.vocab_size, (batch, prompt_len), generator=g)
    so, st = ob.new_state(batch), tb.new_state(batch)
    ob.encode(so, ids)
    tb.encode(st, ids)
    assert ob.length(so) == tb.length(st) == prompt_len
    _check_kv(ob, so, tb, st)
    t = torch.tensor(0.7)
    canvas = torch.randint(0, ob.vocab_size, (batch, ob.canvas_length), generator=g)
    soft = None
    for _ in range(2):  # first step (zeros) and a self-conditioned step
        lo, no = ob.denoise(so, canvas, soft, t)
        lt, nt = tb.denoise(st, canvas, soft, t)
        assert lo.dtype == torch.float32 and lo.shape == lt.shape
        assert rel(lo, lt) < TOL and rel(no, nt) < TOL
        soft = nt
    ob.encode(so, canvas)  # commit
    tb.encode(st, canvas)
    _check_kv(ob, so, tb, st)
    lo, no = ob.denoise(so, canvas, soft, t)
    lt, nt = tb.denoise(st, canvas, soft, t)
    assert rel(lo, lt) < TOL and rel(no, nt) < TOL


class _Recording(BackendWrapper):
    """TorchBackend that records each step's inputs and outputs."""

    def __init__(self, inner):
        super().__init__(inner)
        self.steps = []

    def denoise(self, s, canvas, soft, t):
        raw, nxt = self.inner.denoise(s, canvas, soft, t)
        self.steps.append((canvas.clone(), raw, nxt))
        return raw, nxt


class _Replay(_Recording):
    """ORT backend whose state and logits are real, checked against the recorded torch step, which it returns."""

    def __init__(self, inner, recorded):
        super().__init__(inner)
        self.recorded, self.diffs = recorded, []

    def denoise(self, s, canvas, soft, t):
        canvas_t, raw_t, nxt_t = self.recorded[len(self.diffs)]
        assert torch.equal(canvas, canvas_t)
        raw, nxt = self.inner.denoise(s, canvas, soft, t)
        self.diffs.append((float((raw - raw_t).abs().max()), float((nxt - nxt_t).abs().max())))
        return raw_t, nxt_t


def test_sampler_on_ort_replays_torch_logits(backends):
    ob, tb = backends
    cfg = tiny_sampler(ob.cfg).replace(max_new_tokens=2 * ob.canvas_length, max_denoising_steps=6,
                                       ignore_eos=True)
    prompt = torch.randint(0, ob.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    rec = _Recording(tb)
    ref = generate(rec, prompt, cfg, torch.Generator().manual_seed(7))
    rep = _Replay(ob, rec.steps)
    out = generate(rep, prompt, cfg, torch.Generator().manual_seed(7))
    assert len(rep.diffs) == len(rec.steps) == sum(ref.steps_per_canvas) and ref.canvases == 2
    assert max(d for d, _ in rep.diffs) < 1e-4 and max(d for _, d in rep.diffs) < 1e-4
    assert torch.equal(out.sequences, ref.sequences)


def test_rows_with_different_lengths_share_one_batch(backends):
    """Contract v2: per-row past_length lets requests at different positions share one denoiser / commit batch
    (what Triton's dynamic batcher does); each row equals its own torch run."""
    from dgemma.runtime.graph_backend import GraphState

    ob, tb = backends
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, ob.vocab_size, (1, n), generator=g) for n in (9, 37)]  # around the window (16)
    canvas = torch.randint(0, ob.vocab_size, (2, ob.canvas_length), generator=g)
    singles, refs = [], []
    for p in prompts:
        so, st = ob.new_state(1), tb.new_state(1)
        ob.encode(so, p)
        tb.encode(st, p)
        singles.append(so)
        refs.append(st)
    both = GraphState(2, [s.lengths[0] for s in singles],
                      [torch.cat([a, b]) for a, b in zip(singles[0].kv, singles[1].kv)])
    t = torch.tensor(0.8)
    lo, no = ob.denoise(both, canvas, None, t)
    for r, st in enumerate(refs):
        lt, nt = tb.denoise(st, canvas[r:r + 1], None, t)
        assert rel(lo[r:r + 1], lt) < TOL and rel(no[r:r + 1], nt) < TOL
    ob.encode(both, canvas)  # commit both rows at their own positions
    assert both.lengths == [9 + ob.canvas_length, 37 + ob.canvas_length]
    for r, st in enumerate(refs):
        tb.encode(st, canvas[r:r + 1])
        one = GraphState(1, [both.lengths[r]], [a[r:r + 1] for a in both.kv])
        for j, kv in enumerate(ob.kv_tensors(one)):
            k, v = st.prefix(j // 2)
            assert rel(kv, (k, v)[j % 2]) < TOL
