"""Sampler unit tests on scripted logits: no model, no weights."""


import pytest
import torch

from dgemma.core.config import SamplerConfig
from dgemma.core.errors import Cancelled, ConfigError, RequestError
from dgemma.generation.sampler import accept_mask, entropy, finalize_canvas, generate, temperature


class FakeBackend:
    """Logits from a callable(step_in_canvas, canvas) -> [B,C,V]; records calls."""

    def __init__(self, fn, vocab=8, canvas=4, max_context=1000):
        self.fn, self.vocab_size, self.canvas_length = fn, vocab, canvas
        self.device, self.max_context = torch.device("cpu"), max_context
        self.calls, self.encoded, self.softs = 0, [], []

    def new_state(self, batch):
        return {"len": 0}

    def length(self, state):
        return state["len"]

    def encode(self, state, ids):
        self.encoded.append(ids.clone())
        state["len"] += ids.shape[1]

    def denoise(self, state, canvas, soft, t):
        self.calls += 1
        self.softs.append(soft)
        raw = self.fn(self.calls, canvas)
        return raw, (raw / t)[..., :2].clone()  # any tensor derived from proc


def test_temperature_schedule_fp32_exact():
    cfg = SamplerConfig()
    ts = [temperature(cfg, n, "cpu") for n in range(48, 0, -1)]
    assert all(t.dtype == torch.float32 and t.ndim == 0 for t in ts)
    assert ts[0].item() == torch.tensor(0.8, dtype=torch.float32).item()
    assert ts[1].item() == torch.tensor(0.791666687, dtype=torch.float32).item()
    assert ts[-1].item() == torch.tensor(0.408333331, dtype=torch.float32).item()
    # the divisor differs from a float64-computed-then-rounded one in some steps (spec §11)
    f64 = [torch.tensor(0.4 + 0.4 * (n / 48), dtype=torch.float32).item() for n in range(48, 0, -1)]
    assert sum(a.item() != b for a, b in zip(ts, f64)) == 12  # 12 of 48, as recorded in spec §11


def test_entropy_equals_categorical():
    x = torch.randn(3, 5, 11) * 4
    x[0, 0, 3] = -float("inf")
    ref = torch.distributions.Categorical(logits=x).entropy()
    torch.testing.assert_close(entropy(x), ref, rtol=0, atol=0)


def test_accept_mask_prefix_of_sorted_entropies():
    h = torch.tensor([[0.5, 0.01, 0.04, 0.2, 0.06]])
    # sorted: 0.01, 0.04, 0.06, 0.2, 0.5 ; prefix sums before each rank: 0, .01, .05, .11, .31
    assert accept_mask(h, 0.1).tolist() == [[False, True, True, False, True]]
    # the lowest-entropy position is always accepted, however large
    assert accept_mask(torch.tensor([[9.0, 7.0]]), 0.1).tolist() == [[False, True]]


def test_finalize_canvas_eos_to_pad_and_finished_rows():
    eos = torch.tensor([1, 106])
    seq = torch.tensor([[5, 5, 9, 1, 7, 1], [5, 5, 3, 4, 5, 6], [5, 5, 106, 8, 8, 8]])
    seq, fin = finalize_canvas(seq, torch.zeros(3, dtype=torch.bool), 4, eos, 0)
    assert fin.tolist() == [True, False, True]
    assert seq.tolist() == [[5, 5, 9, 1, 0, 0], [5, 5, 3, 4, 5, 6], [5, 5, 106, 0, 0, 0]]
    # next canvas: earlier-finished rows become all pad
    seq = torch.cat([seq, torch.tensor([[2, 2, 2, 2], [3, 1, 3, 3], [4, 4, 4, 4]])], dim=1)
    seq, fin = finalize_canvas(seq, fin, 4, eos, 0)
    assert fin.tolist() == [True, True, True]
    assert seq[:, -4:].tolist() == [[0, 0, 0, 0], [3, 1, 0, 0], [0, 0, 0, 0]]


def _peaked(target, v=8):
    """[B,C] targets -> logits with a clear argmax."""
    return torch.full((*target.shape, v), -5.0).scatter(2, target[..., None], 25.0)


def test_rng_call_order_and_renoise():
    """Per canvas 1 randint; per step 1 multinomial + 1 randint, drawn from the caller's generator only."""
    b, c, v = 2, 4, 8
    be = FakeBackend(lambda n, canvas: torch.zeros(b, c, v), vocab=v, canvas=c)
    cfg = SamplerConfig(max_new_tokens=4, max_denoising_steps=3, adaptive_stopping=False, ignore_eos=True)
    torch.manual_seed(123)  # global RNG must not be consumed
    global_state = torch.get_rng_state()
    res = generate(be, torch.ones(b, 3, dtype=torch.long), cfg, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state)
    g = torch.Generator().manual_seed(7)
    canvas = torch.randint(0, v, (b, c), generator=g)
    for n in (3, 2, 1):
        proc = torch.zeros(b, c, v) / temperature(cfg, n, "cpu")
        samp = torch.multinomial(torch.softmax(proc, -1).view(-1, v), 1, generator=g).view(b, c)
        acc = accept_mask(entropy(proc), cfg.entropy_bound)  # uniform: only one position per row accepted
        assert acc.sum(-1).tolist() == [1, 1]
        noise = torch.randint(0, v, (b, c), generator=g)
        canvas = torch.where(~acc, noise, torch.where(acc, samp, canvas))
    # nothing else consumed: the next draws agree
    assert torch.equal(torch.randint(0, 1000, (5,), generator=g), torch.randint(0, 1000, (5,), generator=_replay(7, b, c, v)))
    assert res.steps_per_canvas == [3] and be.calls == 3
    assert be.softs[0] is None and be.softs[1] is not None  # self-conditioning reset per canvas


def _replay(seed, b, c, v):
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, v, (b, c), generator=g)
    for _ in range(3):
        torch.multinomial(torch.full((b * c, v), 1.0 / v), 1, generator=g)
        torch.randint(0, v, (b, c), generator=g)
    return g


def test_adaptive_stopping_and_freeze():
    """Row 0 converges from step 2, row 1 never: row 0 stops after step 3 and stays frozen."""
    b, c, v = 2, 4, 8
    t0 = torch.tensor([[1, 2, 3, 4]])

    def fn(n, canvas):
        out = torch.randn(b, c, v, generator=torch.Generator().manual_seed(n))
        if n >= 2:
            out[0] = _peaked(t0 + 1)[0]
        return out

    drafts = []
    be = FakeBackend(fn, vocab=v, canvas=c)
    cfg = SamplerConfig(max_new_tokens=4, max_denoising_steps=6, ignore_eos=True)
    res = generate(be, torch.ones(b, 2, dtype=torch.long), cfg, torch.Generator().manual_seed(0),
                   on_step=lambda ev: drafts.append((ev.step, ev.draft.clone(), ev.done.clone())))
    assert res.steps_per_canvas == [6]  # row 1 keeps the batch running
    assert res.forward_passes.tolist() == [3, 6]
    assert drafts[2][2].tolist() == [True, False]
    for step, draft, done in drafts[2:]:
        assert draft[0].tolist() == (t0 + 1)[0].tolist()  # frozen argmax
    assert res.new_tokens[0].tolist() == (t0 + 1)[0].tolist()


def test_eos_inside_canvas_finishes_generation_early():
    c, v = 4, 8
    be = FakeBackend(lambda n, canvas: _peaked(torch.tensor([[3, 1, 5, 6]]), v), vocab=v, canvas=c)
    cfg = SamplerConfig(max_new_tokens=12, max_denoising_steps=2, eos_token_ids=(1,), adaptive_stopping=False)
    res = generate(be, torch.ones(1, 2, dtype=torch.long), cfg, torch.Generator().manual_seed(0))
    assert res.canvases == 1 and res.new_tokens.tolist() == [[3, 1, 0, 0]]
    assert res.tokens_per_forward.tolist() == [1.0]  # 2 non-pad tokens / 2 passes
    assert len(be.encoded) == 1  # no commit after the last canvas


def test_commit_reencodes_argmax_canvas_at_next_positions():
    c, v = 4, 8
    be = FakeBackend(lambda n, canvas: _peaked(torch.tensor([[3, 4, 5, 6]]), v), vocab=v, canvas=c)
    cfg = SamplerConfig(max_new_tokens=9, max_denoising_steps=2, adaptive_stopping=False, ignore_eos=True)
    res = generate(be, torch.tensor([[2, 7]]), cfg, torch.Generator().manual_seed(0))
    assert res.canvases == 3 and res.sequences.shape == (1, 2 + 12)
    assert [e.tolist() for e in be.encoded] == [[[2, 7]], [[3, 4, 5, 6]], [[3, 4, 5, 6]]]


def test_cancellation_raises_between_steps():
    be = FakeBackend(lambda n, canvas: torch.zeros(1, 4, 8))
    calls = []
    with pytest.raises(Cancelled):
        generate(be, torch.ones(1, 2, dtype=torch.long), SamplerConfig(max_new_tokens=4),
                 torch.Generator().manual_seed(0), should_stop=lambda: len(calls) > 0 or calls.append(1) or False)
    assert be.calls == 1


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1 (got 0)"),
    (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(t_min=0.9), "t_min < t_max"),
    (dict(entropy_bound=0.0), "entropy_bound must be > 0"),
    (dict(confidence_threshold=float("nan")), "finite"),
    (dict(max_new_tokens=2.5), "got 2.5"),
])
def test_sampler_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        SamplerConfig(**kw)


def test_request_longer_than_context_is_rejected():
    be = FakeBackend(lambda n, canvas: torch.zeros(1, 4, 8), max_context=10)
    with pytest.raises(RequestError, match=r"exceeds max_context=10"):
        generate(be, torch.ones(1, 7, dtype=torch.long), SamplerConfig(max_new_tokens=4), torch.Generator())
    with pytest.raises(RequestError, match="outside the vocabulary 0..7"):
        generate(be, torch.tensor([[1, 9]]), SamplerConfig(max_new_tokens=4), torch.Generator())


def _recording(backend):
    """Wrap a backend: every denoise call's raw logits and temperature, in order."""
    calls = []
    real = backend.denoise

    def denoise(state, canvas, soft, t, *a, **kw):
        raw, nxt = real(state, canvas, soft, t, *a, **kw)
        calls.append((raw.clone(), t.clone()))
        return raw, nxt

    backend.denoise = denoise
    return calls


@pytest.mark.parametrize("adaptive", [True, False])
def test_logprobs_recomputed_from_the_logits_of_the_fixing_step(adaptive):
    """Each committed token's log-probability is log_softmax(raw / T) (float64 here, independently) at that token
    under the step that fixed it: the step a row stopped at (adaptive) or the canvas's last step; the top-K are the
    K largest of that distribution, in order. Real model (the embedded tiny one), two rows."""
    from dgemma.runtime.factory import create

    eng = create("torch", "fp32", dtype="float32")
    calls = _recording(eng.backend)
    cfg = eng.sampler.replace(max_new_tokens=64, adaptive_stopping=adaptive, max_denoising_steps=6, ignore_eos=True)
    ids = torch.tensor([eng.tokenizer.encode_chat("sort: 3 1 4 1 5 9 2 6 5 3")] * 2)
    stops = []
    res = generate(eng.backend, ids, cfg, torch.Generator().manual_seed(3), logprobs=3,
                   on_step=lambda ev: stops.append(ev.done.clone()))
    c, k = eng.backend.canvas_length, 3
    assert res.logprobs.shape == (2, 64) and res.top_ids.shape == res.top_logprobs.shape == (2, 64, 3)
    step = 0
    for ci, n in enumerate(res.steps_per_canvas):
        canvas_calls, canvas_stops = calls[step : step + n], stops[step : step + n]
        step += n
        for b in range(2):
            # the first step at which row b was done, else the last
            fixing = next((i for i, d in enumerate(canvas_stops) if bool(d[b])), n - 1)
            raw, t = canvas_calls[fixing]
            lp = torch.log_softmax(raw[b].double() / t.double(), dim=-1)  # [C, V]
            toks = res.new_tokens[b, ci * c : (ci + 1) * c]
            want = lp.gather(-1, toks[:, None]).squeeze(-1)
            got = res.logprobs[b, ci * c : (ci + 1) * c].double()
            assert (got - want).abs().max() < 1e-5
            top_lp, top_ids = lp.topk(k, dim=-1)
            assert torch.equal(res.top_ids[b, ci * c : (ci + 1) * c], top_ids)
            assert (res.top_logprobs[b, ci * c : (ci + 1) * c].double() - top_lp).abs().max() < 1e-5
            assert bool((toks == top_ids[:, 0]).all())  # the committed canvas is the argmax of that step
    assert step == len(calls)
