"""The serving pieces without a server: the encoder/denoiser batch runner, the BLS backend over a stand-in for
pb_utils (each BLS request answered by the GraphRunner that the Triton model would run), the dgemma model's slots
and metrics recorder. build/onnx/fp32 comes from the session fixture (conftest.ensure_onnx_fp32)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from dgemma.core import contract as graphs
from dgemma.core.errors import Cancelled
from dgemma.serving.metrics import Recorder
from dgemma.serving.slots import Busy, Slots
from dgemma.serving.graph_models import GraphRunner

PROMPT = "sort: 8 0 7 2 2 9 4 1 6 3"


@pytest.fixture(scope="module")
def runners(onnx_fp32):
    from dgemma.tiny import ensure_tiny

    return {g: GraphRunner(g, "onnxruntime", onnx_dir=onnx_fp32, checkpoint=ensure_tiny(), threads=1)
            for g in graphs.GRAPHS}


class FakePb:
    """The slice of triton_python_backend_utils that BlsBackend uses; requests go to GraphRunners and every
    call is recorded with its input shapes (the Triton model would see the same)."""

    def __init__(self, runners):
        self.runners, self.log = runners, []
        pb = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._a = name, array

            @staticmethod
            def from_dlpack(name, x):
                return Tensor(name, torch.utils.dlpack.from_dlpack(x.__dlpack__()).numpy())

            def name(self):
                return self._name

            def to_dlpack(self):
                return torch.from_numpy(np.ascontiguousarray(self._a)).__dlpack__()

        class Response:
            def __init__(self, outs):
                self.outs = outs

            def has_error(self):
                return False

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model, self.names, self.inputs = model_name, requested_output_names, inputs

            def exec(self):
                runner = pb.runners[self.model]
                feed = {}
                for t in self.inputs:
                    spec = next(s for s in runner.inputs if s.name == t.name())
                    feed[t.name()] = t._a.reshape(-1) if len(spec.dims) == 1 else t._a  # config reshape [1] -> []
                pb.log.append((self.model, {k: v.shape for k, v in feed.items()}))
                return Response(dict(zip([s.name for s in runner.outputs], runner.run(feed))))

        self.Tensor, self.InferenceRequest = Tensor, InferenceRequest

    @staticmethod
    def get_output_tensor_by_name(resp, name):
        return FakePb.T(resp.outs[name])

    class T:
        def __init__(self, a):
            self.a = a

        def to_dlpack(self):
            return torch.from_numpy(np.ascontiguousarray(self.a)).__dlpack__()


def test_bls_backend_generates_what_ort_backend_generates(runners, onnx_fp32):
    """Same tokens, steps and statistics as in-process OrtBackend for the same seed (B=1, as the model runs it);
    every request has the capacity shapes (max_context slots), so Triton can batch any two of them."""
    from dgemma.model.checkpoint import load_checkpoint
    from dgemma.runtime.bls_backend import BlsBackend
    from dgemma.runtime.ort_backend import OrtBackend
    from dgemma.generation.sampler import generate
    from dgemma.tiny import ensure_tiny
    from dgemma.model.tokens import Tokenizer

    torch.set_num_threads(1)
    ck = load_checkpoint(ensure_tiny())
    tok = Tokenizer(ensure_tiny())
    pb = FakePb(runners)
    bls = BlsBackend(ck.config, "fp32", max_context=256, pb_utils=pb, target="cpu/bf16")
    ort = OrtBackend(onnx_fp32, max_context=256, threads=1)
    ids = torch.tensor([tok.encode_chat(PROMPT)])
    cfg = ck.sampler.replace(max_new_tokens=64, ignore_eos=True)
    a = generate(bls, ids, cfg, torch.Generator().manual_seed(3))
    b = generate(ort, ids, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, b.sequences) and a.steps_per_canvas == b.steps_per_canvas
    assert bls.calls == {"encoder": 2, "denoiser": sum(a.steps_per_canvas)}
    den = [shapes for m, shapes in pb.log if m == "denoiser"]
    assert all(s == den[0] for s in den)  # equal shapes at every step
    assert den[0][graphs.past_key(2)] == (1, 1, 256, 64) and den[0][graphs.PAST_LENGTH] == (1,)


def test_run_batch_equals_one_call_per_request(runners):
    """A dynamic batch of 3 requests (one with 2 rows) concatenated along dim 0 gives each request exactly the
    outputs of its own call (ORT CPU: bit-identical here)."""
    r = runners[graphs.DENOISER]
    rng = np.random.default_rng(0)
    feeds = []
    for rows, p in ((1, 40), (2, 75), (1, 120)):
        f = {}
        for t in r.inputs:
            shape = [rows if d == graphs.BATCH else 256 if d == graphs.KV_CAPACITY else d for d in t.dims]
            if t.name == "canvas_ids":
                f[t.name] = rng.integers(0, r.cfg.vocab_size, shape).astype(np.int64)
            elif t.name == "position_ids":
                f[t.name] = (p + np.arange(shape[1]))[None].repeat(rows, 0).astype(np.int64)
            elif t.name == graphs.PAST_LENGTH:
                f[t.name] = np.full(shape, p, np.int64)
            elif t.name == "temperature":
                f[t.name] = np.full(shape, 0.8, np.float32)
            else:
                f[t.name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        feeds.append(f)
    batched = r.run_batch(feeds)
    for f, outs in zip(feeds, batched):
        single = r.run(f)
        assert [o.shape for o in outs] == [o.shape for o in single]
        for o, s in zip(outs, single):
            np.testing.assert_array_equal(o, s)


def test_slots_queue_in_order_refuse_beyond_and_free_on_release():
    slots = Slots(size=1, max_queued=1)
    slots.acquire()
    order = []

    def waiter():
        slots.acquire(on_queued=lambda: order.append("queued"))
        order.append("waiter")
        slots.release()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    assert slots.queued == 1
    with pytest.raises(Busy, match=r"dgemma is full: 1 requests generating \(max_batch=1, GpuProfile.max_batch\) "
                                   r"and 1 queued \(max 1\); retry later"):
        slots.acquire()
    slots.release()
    t.join(2)
    assert order == ["queued", "waiter"] and slots.in_use == 0 and slots.queued == 0
    slots.acquire()
    with pytest.raises(Cancelled, match="cancelled while queued"):
        slots.acquire(should_stop=lambda: True)
    assert slots.queued == 0 and slots.in_use == 1


def test_recorder_reports_steps_canvases_outcomes():
    seen = {}

    class M:
        def __init__(self, key):
            self.key = key

        def observe(self, v):
            seen.setdefault(self.key, []).append(v)

        def increment(self, v):
            seen[self.key] = seen.get(self.key, 0) + v

        def set(self, v):
            seen[self.key] = v

    rec = Recorder(lambda name, labels: M((name, tuple(sorted(labels.items())))))
    slots = Slots(2, 4)
    rec.canvas(5)
    rec.canvas(3)
    rec.finished(2, "ok", slots)
    rec.finished(1, "cancelled", slots)
    assert seen[("dgemma_steps_per_canvas", ())] == [5.0, 3.0]
    assert seen[("dgemma_canvases_per_request", ())] == [2.0, 1.0]
    assert seen[("dgemma_requests_total", (("outcome", "ok"),))] == 1
    assert seen[("dgemma_requests_total", (("outcome", "cancelled"),))] == 1
    assert seen[("dgemma_requests_active", ())] == 0.0
    Recorder(None).canvas(1)  # no metrics (tests, plain runs): a no-op


def test_torch_runner_matches_onnxruntime(runners):
    """The torch python variant of the graph models (for GPUs without Triton's tensorrt backend; Triton-free here:
    its DLPack path inside a server is not exercised on this CPU box) computes what the ONNX graphs compute."""
    from dgemma.tiny import ensure_tiny

    rng = np.random.default_rng(1)
    for g in graphs.GRAPHS:
        ref = runners[g]
        tr = GraphRunner(g, "torch", checkpoint=ensure_tiny(), threads=1, precision="fp32")
        assert [t.name for t in tr.inputs] == [t.name for t in ref.inputs]
        feed = {}
        for t in ref.inputs:
            shape = [2 if d == graphs.BATCH else 5 if d == graphs.SEQ else 64 if d == graphs.KV_CAPACITY else d
                     for d in t.dims]
            if t.name in ("input_ids", "canvas_ids"):
                feed[t.name] = rng.integers(0, ref.cfg.vocab_size, shape).astype(np.int64)
            elif t.name == "position_ids":
                feed[t.name] = (np.array([[10], [20]]) + np.arange(shape[1])[None]).astype(np.int64)
            elif t.name == graphs.PAST_LENGTH:
                feed[t.name] = np.array([10, 20], np.int64)
            elif t.name == "temperature":
                feed[t.name] = np.full(shape, 0.9, np.float32)
            else:
                feed[t.name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
        want = ref.run(feed)
        got = tr.run_batch([{k: torch.from_numpy(v[:1]) for k, v in feed.items()},
                            {k: torch.from_numpy(v[1:]) for k, v in feed.items()}])
        for o, w in zip([torch.cat(x) for x in zip(*got)], want):
            assert o.shape == w.shape
            assert float((o - torch.from_numpy(w)).abs().max()) <= 1e-4 * max(1.0, float(np.abs(w).max()))
