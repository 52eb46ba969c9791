"""In-flight batching (dgemma.generation.batch.InFlight) on the tiny model's static passes in torch: rows at
different prompt lengths, canvases and steps share calls, and every row gets exactly the answer it gets alone."""

from __future__ import annotations

import pytest
import torch

from dgemma.core.errors import RequestError
from dgemma.generation.batch import InFlight, Row
from dgemma.generation.infill import infill_template
from dgemma.generation.sampler import Generation, Rng, check_request, generate, stats_for

# (prompt, seed, sampler overrides, infill, logprobs): steps, temperatures, entropy bounds, adaptive on and off,
# lengths of prompt and output, an infill template, log-probabilities with and without alternatives
SPECS = [
    ("sort: 3 1 2", 1, {}, None, None),
    ("sort: 9 8 7 6 5 4 3 2 1 0 4 4 8 1 2", 2, {"max_denoising_steps": 5}, None, 3),
    ("sort: 5 5 1", 3, {"adaptive_stopping": False, "max_denoising_steps": 4, "max_new_tokens": 64}, None, 0),
    ("sort: 1", 4, {"t_min": 0.1, "t_max": 1.5}, None, None),
    ("sort: 7 7 7 1 2", 5, {"entropy_bound": 0.5, "max_new_tokens": 96}, None, None),
    ("sort: 4 2 9 9", 6, {"max_new_tokens": 64}, "1 _ 2 _ 9 _ 9 _", 2),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(graph_engine):
    return graph_engine


def _prompt(engine, text):
    return torch.tensor([engine.tokenizer.encode_chat(text)])


def _settings(engine, spec):
    text, seed, over, infill, logprobs = spec
    cfg = engine.sampler.replace(**over)
    template = None
    if infill is not None:
        template = infill_template(engine.tokenizer, infill, engine.backend.canvas_length, cfg.max_new_tokens)
    return _prompt(engine, text), cfg, seed, template, logprobs


def reference(engine, spec):
    """The reference driver, generate(), one request alone (B=1, the prompt in one encoder call)."""
    prompt, cfg, seed, template, logprobs = _settings(engine, spec)
    return generate(engine.backend, prompt, cfg, torch.Generator().manual_seed(seed), template=template,
                    logprobs=logprobs)


def solo(engine, spec, prefill_chunk: int = 512):
    """The request alone in the scheduler's batch (its prompt in chunks of prefill_chunk tokens: a chunked prefill
    rounds differently from a whole one, so "alone" means with the same chunk size)."""
    r = row(engine, spec)
    drive(InFlight(engine.backend, 1, prefill_chunk), [r])
    return r.gen.result()


def row(engine, spec, **kw) -> Row:
    prompt, cfg, seed, template, logprobs = _settings(engine, spec)
    b = engine.backend
    gen = Generation(prompt, cfg, Rng([torch.Generator().manual_seed(seed)]), b.canvas_length, b.vocab_size,
                     template, check_request(prompt, cfg, b), logprobs, stats_for(b.device))
    return Row(gen, prompt, **kw)


def drive(flight: InFlight, pending: list[Row], reports: list | None = None, limit: int = 2000) -> None:
    """Admit rows in order whenever a slot is free, step until every row has left."""
    pending = list(pending)
    for _ in range(limit):
        while pending and flight.free:
            flight.add(pending.pop(0))
        if not flight.rows:
            return
        rep = flight.step()
        if reports is not None:
            reports.append(rep)
    raise AssertionError("rows did not finish")


def same(a, b) -> None:
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.steps_per_canvas == b.steps_per_canvas
    assert a.forward_passes.tolist() == b.forward_passes.tolist()
    for name in ("logprobs", "top_ids", "top_logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


def test_a_row_alone_is_the_reference_driver(engine):
    """InFlight drives a Generation exactly as generate() does (one row, unchunked prompt)."""
    for spec in SPECS:
        same(solo(engine, spec), reference(engine, spec))


def test_rows_sharing_calls_get_their_solo_answers(engine):
    want = [solo(engine, s, prefill_chunk=3) for s in SPECS * 2]
    rows = [row(engine, s) for s in SPECS * 2]
    reports = []
    drive(InFlight(engine.backend, 4, prefill_chunk=3), rows, reports)
    for r, w in zip(rows, want):
        same(r.gen.result(), w)
    denoise_rows = [rep.denoised[0] for rep in reports if rep.denoised]
    assert max(denoise_rows) == 4 and min(denoise_rows) == 1
    finished = [r for rep in reports for r in rep.finished]
    assert sorted(map(id, finished)) == sorted(map(id, rows))  # each row left exactly once
    assert not any(rep.failed or rep.cancelled for rep in reports)
    # prompts are encoded in chunks of 3 tokens, commits as whole canvases, rows of one length per call
    enc_lengths = {s for rep in reports for _, s, _ in rep.encoded}
    assert enc_lengths <= {1, 2, 3, engine.backend.canvas_length} and 3 in enc_lengths


def test_long_prompt_prefill_is_chunked_while_others_denoise(engine):
    """A long prompt joins while a row is denoising: it advances one chunk per iteration and the denoising row
    takes its step in every one of those iterations instead of waiting for the whole prefill."""
    busy_spec = ("sort: 5 5 1", 3, {"adaptive_stopping": False, "max_new_tokens": 64}, None, None)
    long_spec = (" ".join(["sort: 1 2 3"] * 12), 9, {}, None, None)
    busy, long = row(engine, busy_spec), row(engine, long_spec)
    flight = InFlight(engine.backend, 2, prefill_chunk=8)
    flight.add(busy)
    while not busy.gen.steps_per_canvas and getattr(busy.gen, "steps", 0) == 0:  # busy's prompt, then its first step
        flight.step()
    flight.add(long)
    n = long.prompt.shape[1]
    chunks = []
    while long.prefilled < n:
        rep = flight.step()
        chunks += [s for rows, s, _ in rep.encoded if s != engine.backend.canvas_length]
        assert rep.denoised is not None and rep.denoised[0] >= 1 and busy in flight.rows
    assert n > 64 and chunks == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    drive(flight, [])
    same(long.gen.result(), solo(engine, long_spec, prefill_chunk=8))
    same(busy.gen.result(), solo(engine, busy_spec, prefill_chunk=8))


def test_cancelled_row_frees_its_slot_at_once(engine):
    steps = {"n": 0}

    def count(ev):
        steps["n"] += 1

    gone = row(engine, SPECS[2], on_step=count, should_stop=lambda: steps["n"] >= 2)
    waiting = row(engine, SPECS[1])
    flight = InFlight(engine.backend, 1, prefill_chunk=512)
    flight.add(gone)
    reports = []
    for _ in range(10):
        if flight.free and waiting not in flight.rows and waiting.gen.phase == "encode" and waiting.prefilled == 0:
            flight.add(waiting)
        reports.append(flight.step())
        if any(rep.cancelled for rep in reports):
            break
    assert reports[-1].cancelled == [gone] and steps["n"] == 2 and flight.free == 1
    drive(flight, [waiting])
    same(waiting.gen.result(), solo(engine, SPECS[1]))


def test_a_failing_row_fails_alone(engine):
    def boom(ev):
        raise RuntimeError("client callback broke")

    rows = [row(engine, SPECS[0]), row(engine, SPECS[3], on_step=boom), row(engine, SPECS[4])]
    reports = []
    drive(InFlight(engine.backend, 3, prefill_chunk=512), rows, reports)
    failed = [(r, e) for rep in reports for r, e in rep.failed]
    assert [r for r, _ in failed] == [rows[1]] and "client callback broke" in str(failed[0][1])
    same(rows[0].gen.result(), solo(engine, SPECS[0]))
    same(rows[2].gen.result(), solo(engine, SPECS[4]))


class FlakyBackend:
    """Delegates to a real backend; the n-th denoise call raises."""

    def __init__(self, backend, fail_at: int):
        self.b, self.fail_at, self.calls = backend, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.b, name)

    def denoise(self, *a, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RequestError("the graph call failed")
        return self.b.denoise(*a, **kw)


def test_a_failed_call_fails_its_rows_and_the_next_rows_go_on(engine):
    flight = InFlight(FlakyBackend(engine.backend, fail_at=2), 2, prefill_chunk=512)
    rows = [row(engine, SPECS[0]), row(engine, SPECS[2]), row(engine, SPECS[4])]
    reports = []
    drive(flight, rows, reports)
    failed = [r for rep in reports for r, _ in rep.failed]
    assert failed == rows[:2] and flight.free == 2
    same(rows[2].gen.result(), solo(engine, SPECS[4]))


def test_rows_api_gathers_any_subset(engine):
    """encode/denoise over rows [2, 0] of a 3-row state: what each row computes alone; row 1 untouched."""
    b = engine.backend
    ids = torch.cat([_prompt(engine, "sort: 1 2 3"), _prompt(engine, "sort: 3 2 1")])
    st = b.new_state(3)
    b.encode(st, ids, rows=[2, 0])
    assert st.lengths == [ids.shape[1], 0, ids.shape[1]]
    canvas = torch.randint(0, b.vocab_size, (2, b.canvas_length), generator=torch.Generator().manual_seed(0))
    raw, soft = b.denoise(st, canvas, None, torch.tensor([0.8, 0.5]), rows=[2, 0])
    for i, (text, t) in enumerate([("sort: 1 2 3", 0.8), ("sort: 3 2 1", 0.5)]):
        alone = b.new_state(1)
        b.encode(alone, _prompt(engine, text))
        r1, s1 = b.denoise(alone, canvas[i : i + 1], None, torch.tensor(t))
        assert torch.equal(raw[i : i + 1], r1) and torch.equal(soft[i : i + 1], s1)
    assert all(float(a[1].abs().max()) == 0 for a in st.kv)
    b.reset_rows(st, [2])
    assert st.lengths == [ids.shape[1], 0, 0]


def test_prefill_chunk_must_be_positive(engine):
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        InFlight(engine.backend, 2, prefill_chunk=0)
