"""The dgemma model's scheduler (dgemma.serving.scheduler) with real Jobs on the tiny model's static passes,
without Triton: requests from many threads share batched calls and get the responses they get alone; admission
is first come first served within max_batch rows plus a bounded queue; cancellation and failures stay with their
request; the metrics the model exports are recorded."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dgemma.core.errors import Busy
from dgemma.serving.loop import Job
from dgemma.serving.metrics import Recorder
from dgemma.serving.request import Limits, parse_request
from dgemma.serving.scheduler import Scheduler

# mixed requests: steps, temperatures, infill, adaptive on and off, prompt lengths, streaming, stops, logprobs
REQUESTS = [
    {"text_input": "sort: 3 1 2", "seed": 1, "stream": True},
    {"text_input": "sort: 9 8 7 6 5 4 3 2 1 0 4 4 8 1 2", "seed": 2, "max_denoising_steps": 5, "top_logprobs": 2},
    {"text_input": "sort: 5 5 1", "seed": 3, "adaptive_stopping": False, "max_denoising_steps": 4,
     "max_tokens": 64, "stream": True},
    {"text_input": "sort: 1", "seed": 4, "temperature": 1.5, "return_logprobs": True},
    {"text_input": "sort: 7 7 7 1 2", "seed": 5, "entropy_bound": 0.5, "max_tokens": 96, "stream": True,
     "stream_drafts": True},
    {"text_input": "sort: 4 2 9 9", "seed": 6, "max_tokens": 64, "infill": "2 _ 9 _", "stop_words": ["9 9"]},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(graph_engine):
    return graph_engine


@pytest.fixture(scope="module")
def limits(engine):
    s = engine.sampler
    return Limits("cpu/bf16", max_prompt=128, max_context=256, canvas_length=engine.backend.canvas_length,
                  max_denoising_steps=s.max_denoising_steps, default_max_tokens=s.max_new_tokens,
                  default_entropy_bound=s.entropy_bound, default_t_min=s.t_min, default_t_max=s.t_max)


def _inputs(d: dict) -> dict:
    """Request dict -> the model's input arrays as Triton hands them over ([1, 1] / [1, n], batch dim first)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str):
            out[k] = np.array([[v.encode()]], dtype=np.object_)
        elif isinstance(v, list):
            out[k] = np.array([[x.encode() for x in v]], dtype=np.object_)
        else:
            out[k] = np.array([[v]])
    return out


def _comparable(responses: list[dict]) -> list[dict]:
    return [{k: v.tolist() for k, v in r.items()} for r in responses]


class Client:
    """One request: its Job's responses, and a should_stop hook."""

    def __init__(self, engine, limits, d: dict, stop_after: int | None = None):
        self.responses: list[dict] = []
        self.stop_after = stop_after
        self.job = Job(parse_request(_inputs(d), limits, engine.tokenizer), engine, self.responses.append)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.responses) >= self.stop_after


CHUNK = 4  # prefill chunk of every scheduler here (a chunked prefill rounds differently from a whole one: "alone"
# means alone on a server with the same settings)


def alone(engine, limits, d: dict) -> list[dict]:
    sched = Scheduler(engine.backend, 1, 0, prefill_chunk=CHUNK)
    c = Client(engine, limits, d)
    assert sched.submit(c.job, c.should_stop) == "ok"
    sched.close()
    return _comparable(c.responses)


class Metrics:
    def __init__(self):
        self.seen: dict = {}
        self.lock = threading.Lock()

    def make(self, name, labels):
        key = (name, tuple(sorted(labels.items())))
        seen, lock = self.seen, self.lock

        class M:
            def observe(self, v):
                with lock:
                    seen.setdefault(key, []).append(v)

            def increment(self, v):
                with lock:
                    seen[key] = seen.get(key, 0) + v

            def set(self, v):
                with lock:
                    seen[key] = v

        return M()

    def values(self, name, **labels):
        want = tuple(sorted(labels.items()))
        return [v for (n, lab), v in self.seen.items() if n == name and (not labels or lab == want)]


def test_concurrent_requests_get_their_solo_responses(engine, limits):
    want = [alone(engine, limits, d) for d in REQUESTS]
    metrics = Metrics()
    sched = Scheduler(engine.backend, 4, 16, Recorder(metrics.make), prefill_chunk=CHUNK)
    clients = [Client(engine, limits, d) for d in REQUESTS * 2]
    outcomes = [None] * len(clients)

    def run(i):
        outcomes[i] = sched.submit(clients[i].job, clients[i].should_stop)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sched.close()
    assert outcomes == ["ok"] * len(clients)
    for c, w in zip(clients, want * 2):
        assert _comparable(c.responses) == w  # every response, in order: none lost, none duplicated
    rows = [v for vs in metrics.values("dgemma_rows_per_step") for v in vs]
    assert max(rows) > 1 and max(rows) <= 4
    assert metrics.values("dgemma_requests_total", outcome="ok") == [len(clients)]
    assert len(metrics.values("dgemma_queue_seconds")[0]) == len(clients)
    assert len(metrics.values("dgemma_time_to_first_canvas_seconds")[0]) == len(clients)
    by_rows = {dict(lab)["rows"] for (n, lab) in metrics.seen if n == "dgemma_graph_seconds"
               and dict(lab)["graph"] == "denoiser"}
    assert len(by_rows) > 1  # step time by batch size
    assert metrics.values("dgemma_requests_active") == [0.0] and metrics.values("dgemma_requests_queued") == [0.0]


def test_first_come_first_served_then_busy(engine, limits):
    metrics = Metrics()
    sched = Scheduler(engine.backend, 1, 1, Recorder(metrics.make), prefill_chunk=CHUNK)
    long = Client(engine, limits, {"text_input": "sort: 5 5 1", "adaptive_stopping": False, "max_tokens": 96})
    nxt = Client(engine, limits, REQUESTS[0])
    done = []
    ta = threading.Thread(target=lambda: done.append(("long", sched.submit(long.job, long.should_stop))))
    ta.start()
    while sched.active == 0:
        time.sleep(0.01)
    tb = threading.Thread(target=lambda: done.append(("next", sched.submit(nxt.job, nxt.should_stop))))
    tb.start()
    while sched.queued == 0:
        time.sleep(0.01)
    third = Client(engine, limits, REQUESTS[1])
    with pytest.raises(Busy, match=r"dgemma is full: 1 requests generating \(max_batch=1, GpuProfile.max_batch\) "
                                   r"and 1 queued \(max 1\); retry later"):
        sched.submit(third.job, third.should_stop)
    ta.join(60)
    tb.join(60)
    sched.close()
    assert done == [("long", "ok"), ("next", "ok")] and third.responses == []
    assert metrics.values("dgemma_requests_total", outcome="busy") == [1]


def test_cancelled_while_queued_or_running(engine, limits):
    """A queued request whose client left is dropped without running; a running one leaves at the next step,
    its row free at once; the request behind it runs and gets its solo answer."""
    want = alone(engine, limits, REQUESTS[1])
    sched = Scheduler(engine.backend, 1, 4, prefill_chunk=CHUNK)
    running = Client(engine, limits, {**REQUESTS[2], "max_tokens": 96, "ignore_eos": True}, stop_after=1)  # leaves after canvas 1
    gone = Client(engine, limits, REQUESTS[0], stop_after=0)  # its client is gone before it gets a row
    after = Client(engine, limits, REQUESTS[1])
    out = {}
    threads = [threading.Thread(target=lambda c=c, n=n: out.__setitem__(n, sched.submit(c.job, c.should_stop)))
               for n, c in (("running", running), ("gone", gone), ("after", after))]
    threads[0].start()
    while sched.active == 0:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    sched.close()
    assert out == {"running": "cancelled", "gone": "cancelled", "after": "ok"}
    assert len(running.responses) == 1 and gone.responses == []
    assert _comparable(after.responses) == want


def test_a_failing_request_fails_alone(engine, limits):
    sched = Scheduler(engine.backend, 3, 4, prefill_chunk=CHUNK)
    ok = [Client(engine, limits, d) for d in REQUESTS[:2]]
    bad = Client(engine, limits, REQUESTS[0])

    def broken(tensors):
        raise ConnectionError("the client went away mid-send")

    bad.job._send = broken
    out = {}

    def run(name, c):
        try:
            out[name] = sched.submit(c.job, c.should_stop)
        except Exception as e:  # noqa: BLE001
            out[name] = repr(e)

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", ok[0]), ("bad", bad), ("b", ok[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sched.close()
    assert out["a"] == out["b"] == "ok" and "the client went away mid-send" in out["bad"]
    assert _comparable(ok[0].responses) == alone(engine, limits, REQUESTS[0])
