"""The serving pieces without a server: the encoder/denoiser batch runner, the BLS backend over a stand-in for
pb_utils (each BLS request answered by the GraphRunner that the Triton model would run), in-flight batches over
the exported graphs. build/onnx/fp32 comes from the session fixture (conftest.ensure_onnx_fp32)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from dgemma.core import contract as graphs
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


def test_in_flight_rows_over_ort_and_bls_get_their_solo_answers(runners, onnx_fp32):
    """The scheduler's batches over the exported graphs: in-process ONNX Runtime and BLS requests to the graph
    models (every request carries only the rows of that iteration, at their own lengths); each request's tokens
    are those it gets alone, and both routes agree."""
    from dgemma.generation.batch import InFlight, Row
    from dgemma.generation.sampler import Generation, Rng, check_request, stats_for
    from dgemma.model.checkpoint import load_checkpoint
    from dgemma.model.tokens import Tokenizer
    from dgemma.runtime.bls_backend import BlsBackend
    from dgemma.runtime.ort_backend import OrtBackend
    from dgemma.tiny import ensure_tiny

    torch.set_num_threads(1)
    ck = load_checkpoint(ensure_tiny())
    tok = Tokenizer(ensure_tiny())
    specs = [(PROMPT, 1, {}), ("sort: 1 2", 2, {"max_denoising_steps": 3, "max_new_tokens": 64}),
             ("sort: 9 9 9 9 9 9 9 9 1 1 1", 3, {"adaptive_stopping": False, "max_denoising_steps": 5}),
             ("sort: 4", 4, {"t_min": 0.2, "t_max": 1.4, "ignore_eos": True, "max_new_tokens": 64})]

    def rows(backend):
        out = []
        for text, seed, over in specs:
            ids = torch.tensor([tok.encode_chat(text)])
            cfg = ck.sampler.replace(**over)
            gen = Generation(ids, cfg, Rng([torch.Generator().manual_seed(seed)]), backend.canvas_length,
                             backend.vocab_size, None, check_request(ids, cfg, backend), 0, stats_for(backend.device))
            out.append(Row(gen, ids))
        return out

    def run(backend, capacity):
        flight, pending, sizes = InFlight(backend, capacity, prefill_chunk=8), rows(backend), []
        done = list(pending)
        while pending or flight.rows:
            while pending and flight.free:
                flight.add(pending.pop(0))
            rep = flight.step()
            assert not rep.failed, rep.failed
            sizes += [rep.denoised[0]] if rep.denoised else []
        return [(r.gen.result().sequences.tolist(), r.gen.result().logprobs.tolist()) for r in done], max(sizes)

    pb = FakePb(runners)
    bls = BlsBackend(ck.config, "fp32", max_context=256, pb_utils=pb, target="cpu/bf16")
    ort = OrtBackend(onnx_fp32, max_context=256, threads=1)
    alone, _ = run(ort, 1)
    together, widest = run(ort, 3)
    assert widest == 3 and together == alone
    over_bls, _ = run(bls, 3)
    assert over_bls == alone
    sent = {shapes["canvas_ids"][0] for m, shapes in pb.log if m == "denoiser"}
    assert sent == {1, 2, 3}  # each BLS request carries the rows denoising in that iteration


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
