"""Benchmarks through the Triton `dgemma` model over gRPC, as a client sees them.

Owns: text prompts for a token budget, one streamed request with the arrival time of every response,
closed-loop concurrency levels (N client threads, one gRPC stream each, like perf_analyzer's concurrency
mode), per-answer checks, and the overhead against in-process generation of the same prompts and seeds.
Fields a gRPC client cannot observe (per-step latency, prefill, commit) are None and named in UNOBSERVED
with the reason. With the server's metrics endpoint, each concurrency level also records what the server saw: the
loop's own step time and the graph models' batch sizes (`server_view` / `server_delta`). The arithmetic
(`request_metrics`, `level_metrics`, `overhead`, `server_delta`) is pure and tested on synthetic timelines.
"""

from __future__ import annotations

import math
import queue
import random
import statistics
import string
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import torch

from ..core.contract import DENOISER, MODEL
from ..core.stats import percentile
from ..serving.client import decode_result, encode_inputs, stats
from ..serving.metrics import metric, parse_metrics
from .inprocess import run_generation
from .metrics import summarize

_NO_STEPS = "per-step timing is not observable through gRPC (the model sends one response per committed canvas)"
UNOBSERVED = {
    "prefill_ms": "not observable through gRPC: the first response arrives after prefill and the whole first canvas "
                  "(see time_to_first_canvas_ms)",
    "step_ms_p50": _NO_STEPS + "; step_ms_mean is the inter-canvas time per denoising step, commit included",
    "step_ms_p99": _NO_STEPS,
    "denoise_ms_p50": _NO_STEPS,
    "denoise_ms_p99": _NO_STEPS,
    "commit_ms_mean": "the re-encode of a committed canvas happens inside canvas_loop and is not reported",
    "step_latencies_ms": _NO_STEPS,
}
DEFINITIONS = {
    "generation_tok_s": "canvas_length x (canvases - 1) / (last canvas arrival - first canvas arrival): the inter-"
                        "canvas rate (vLLM's '256 / ITL'); None for one-canvas requests",
    "e2e_tok_s": "committed tokens / (request sent -> last response), tokenization and gRPC included",
    "committed_tokens": "round(tokens_per_forward x denoising steps) from the final statistics response",
    "time_to_first_canvas_ms": "request sent -> first streamed canvas arrives",
}


def text_prompt(tok, tokens: int, seed: int) -> str:
    """Random lowercase words whose chat-rendered prompt has at most `tokens` tokens (at least one word):
    the random-prompt workload of the in-process scenarios, as text the model can take."""
    rng = random.Random(seed)
    words: list[str] = []
    while True:
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
        if words and len(tok.encode_chat(" ".join(words + [w]))) > tokens:
            return " ".join(words)
        words.append(w)
        if len(words) == 1 and len(tok.encode_chat(w)) > tokens:
            return w


@dataclass
class Timed:
    """One request as the client saw it: perf_counter() times, decoded responses in arrival order."""

    prompt: str
    seed: int
    t_send: float = 0.0
    t_responses: list[float] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)
    t_done: float = 0.0
    error: str | None = None


class StreamClient:
    """One gRPC stream to the model; requests on it run one after another (one slot of a level)."""

    def __init__(self, url: str, model: str = MODEL, timeout_s: float = 600.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.model, self.timeout_s = model, timeout_s
        self.events: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(  # tritonclient calls back with keywords result=, error=
            callback=lambda result, error: self.events.put((result, error, time.perf_counter())))
        self._n = 0

    def send(self, prompt: str, seed: int, **params) -> Timed:
        self._n += 1
        rid = str(self._n)
        t = Timed(prompt, seed)
        inputs = encode_inputs(self._grpc, {"text_input": prompt, "seed": seed, "stream": True, **params})
        t.t_send = time.perf_counter()
        self.client.async_stream_infer(self.model, inputs, request_id=rid, enable_empty_final_response=True)
        while True:
            try:
                result, error, at = self.events.get(timeout=self.timeout_s)
            except queue.Empty:
                t.error, t.t_done = f"no response within {self.timeout_s:.0f} s", time.perf_counter()
                return t
            if error is not None:
                t.error, t.t_done = str(error), at
                return t
            resp = result.get_response()
            if resp.id != rid:
                continue  # a late final flag of an earlier request on this stream
            if resp.outputs:
                t.responses.append(decode_result(result))
                t.t_responses.append(at)
            if resp.parameters["triton_final_response"].bool_param:
                t.t_done = at
                return t

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def request_metrics(t: Timed, canvas_length: int) -> dict:
    """Per-request metrics in the in-process schema (bench.derive); unobservable fields are None."""
    m = {k: None for k in UNOBSERVED}
    m["batch"] = 1
    if t.error or not t.responses:
        m.update(error=t.error or "no response carried data", committed_tokens=0)
        return m
    final = t.responses[-1]  # streaming: the last response carries the statistics of the whole request
    canvas_t = t.t_responses[:-1] or t.t_responses  # one response per committed canvas before it
    steps = final["steps_per_canvas"]
    committed = round(final["tokens_per_forward"] * sum(steps))
    e2e = t.t_responses[-1] - t.t_send
    gen = canvas_t[-1] - canvas_t[0] if len(canvas_t) > 1 else None
    later_steps = sum(steps[1:])
    m.update(
        committed_tokens=committed, e2e_s=e2e, e2e_tok_s=committed / e2e if e2e > 0 else None,
        generation_s=gen, generation_tok_s=canvas_length * (len(canvas_t) - 1) / gen if gen else None,
        time_to_first_canvas_ms=1e3 * (canvas_t[0] - t.t_send), canvases=final["canvases"],
        steps_per_canvas=steps, mean_steps_per_canvas=statistics.fmean(steps) if steps else None,
        tokens_per_forward=final["tokens_per_forward"],
        step_ms_mean=1e3 * gen / later_steps if gen and later_steps else None,
        text=("".join(r["text_output"] for r in t.responses[:-1]) if len(t.responses) > 1
              else final["text_output"]), error=None)
    return m


def check_answer(m: dict, canvases: int, canvas_length: int, max_steps: int, ref: dict | None) -> list[str]:
    """What is wrong with one answer: its statistics against the request, and its token count against the
    in-process generation of the same prompt and seed (ref: {committed_tokens}) when there is one."""
    if m.get("error"):
        return [m["error"]]
    bad = []
    steps = m["steps_per_canvas"] or []
    if m["canvases"] != canvases or len(steps) != canvases:
        bad.append(f"{m['canvases']} canvases / {len(steps)} step counts, expected {canvases}")
    if any(s < 1 or s > max_steps for s in steps):
        bad.append(f"steps per canvas {steps} outside 1..{max_steps}")
    if not 0 < m["committed_tokens"] <= canvases * canvas_length:
        bad.append(f"{m['committed_tokens']} committed tokens, expected 1..{canvases * canvas_length}")
    if ref is not None and m["committed_tokens"] != ref["committed_tokens"]:
        bad.append(f"{m['committed_tokens']} committed tokens, in-process generation has {ref['committed_tokens']}")
    return bad


def level_metrics(level: int, rows: list[dict], t_start: float, t_end: float) -> dict:
    """One concurrency level from its per-request metrics (rows carry `problems` from check_answer)."""
    ok = [r for r in rows if not r.get("error")]
    wall = t_end - t_start
    lat = [1e3 * r["e2e_s"] for r in ok]
    ttfc = [r["time_to_first_canvas_ms"] for r in ok]
    gen = [r["generation_tok_s"] for r in ok if r["generation_tok_s"]]
    tokens = sum(r["committed_tokens"] for r in ok)
    return {
        "concurrency": level, "requests": len(rows), "errors": len(rows) - len(ok), "wall_s": wall,
        "requests_s": len(ok) / wall, "tok_s": tokens / wall, "committed_tokens": tokens,
        "latency_ms_p50": percentile(lat, 50), "latency_ms_p99": percentile(lat, 99),
        "ttfc_ms_p50": percentile(ttfc, 50), "ttfc_ms_p99": percentile(ttfc, 99),
        "per_request_generation_tok_s_mean": statistics.fmean(gen) if gen else None,
        "mean_steps_per_canvas": statistics.fmean(r["mean_steps_per_canvas"] for r in ok) if ok else None,
        "all_correct": all(not r["problems"] for r in rows),
        "problems": [f"request {i}: {'; '.join(r['problems'])}" for i, r in enumerate(rows) if r["problems"]][:5],
        "identical_to_in_process": sum(1 for r in rows if r.get("identical_to_in_process")),
    }


def overhead(pairs: list[tuple[dict, dict]]) -> dict:
    """Triton over in-process for the same prompts and seeds: pairs of (triton request metrics, in-process
    metrics with e2e_s, steps_per_canvas and inter_canvas_ms_per_step). Medians over the pairs."""
    pairs = [(t, i) for t, i in pairs if not t.get("error")]
    if not pairs:
        return {"available": False, "reason": "no successful request to compare"}
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    per_step = [(t["step_ms_mean"], i["inter_canvas_ms_per_step"]) for t, i in pairs
                if t["step_ms_mean"] and i.get("inter_canvas_ms_per_step")]
    return {
        "available": True, "requests": len(pairs),
        "e2e_ms_triton_p50": med([1e3 * t["e2e_s"] for t, _ in pairs]),
        "e2e_ms_in_process_p50": med([1e3 * i["e2e_s"] for _, i in pairs]),
        "ratio_per_request": med([t["e2e_s"] / i["e2e_s"] for t, i in pairs]),
        "overhead_ms_per_request": med([1e3 * (t["e2e_s"] - i["e2e_s"]) for t, i in pairs]),
        "overhead_ms_per_step": med([1e3 * (t["e2e_s"] - i["e2e_s"]) / sum(t["steps_per_canvas"]) for t, i in pairs]),
        "ratio_per_step": med([a / b for a, b in per_step]),
        "step_ms_triton": med([a for a, _ in per_step]), "step_ms_in_process": med([b for _, b in per_step]),
        "note": "same prompts and seeds, one request at a time, each in-process generation right before its Triton "
                "request; per request = request sent -> last response vs "
                "prefill start -> last canvas in-process (tokenization, detokenization, Triton and gRPC "
                "are the difference); per step = inter-canvas time per denoising step on both sides"
                + ("" if per_step else "; per-step ratio needs requests of 2+ canvases"),
    }


def run_level(url: str, level: int, jobs: list[tuple[str, int]], params: dict, canvas_length: int,
              progress: str | None = None) -> tuple[list[dict], float, float]:
    """Closed loop: `level` client threads, each with its own stream, take jobs (prompt, seed) until none is
    left. -> (per-request metrics in job order, first send, last response)."""
    todo: queue.Queue = queue.Queue()
    for i, j in enumerate(jobs):
        todo.put((i, j))
    timed: list[Timed | None] = [None] * len(jobs)

    def worker():
        sc = StreamClient(url)
        try:
            while True:
                try:
                    i, (prompt, seed) = todo.get_nowait()
                except queue.Empty:
                    return
                timed[i] = sc.send(prompt, seed, **params)
        finally:
            sc.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
        if progress:
            done = [x for x in timed if x is not None]
            tok = sum(request_metrics(x, canvas_length)["committed_tokens"] for x in done)
            print(f"\r  [{progress}] concurrency {level}: {len(done)}/{len(jobs)} requests, "
                  f"{tok / (time.perf_counter() - t0):8.1f} tok/s", end="", file=sys.stderr, flush=True)
    rows = [request_metrics(t, canvas_length) for t in timed]
    start = min(t.t_send for t in timed)
    end = max(t.t_responses[-1] if t.t_responses else t.t_done for t in timed)
    return rows, start, end


def server_view(url: str, metrics_url: str | None) -> dict:
    """What the server counts (the dgemma model's metrics and Triton's per-model batch statistics), for deltas."""
    view = {"batches": {m: v["batches"] for m, v in stats(url).items()}}
    if metrics_url:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            view["metrics"] = parse_metrics(r.read().decode())
    return view


def server_delta(a: dict, b: dict) -> dict:
    """Per level: batched denoising steps, the mean rows (requests) per step and mean step time as the scheduler
    sees them (dgemma_rows_per_step, dgemma_graph_seconds: BLS round trip included), and each graph model's
    executions by batch size (Triton's statistics)."""
    out: dict = {}
    if "metrics" in a and "metrics" in b:
        def delta(name, **labels):
            return metric(b["metrics"], name, **labels) - metric(a["metrics"], name, **labels)

        d = {k: delta(f"dgemma_graph_seconds_{k}", graph="denoiser") for k in ("count", "sum")}
        out["denoise_steps_in_loop"] = int(d["count"])
        out["step_ms_in_loop"] = 1e3 * d["sum"] / d["count"] if d["count"] else None
        rows, steps = delta("dgemma_rows_per_step_sum"), delta("dgemma_rows_per_step_count")
        out["mean_rows_per_step"] = rows / steps if steps else None
    for model, now in b["batches"].items():
        was = a["batches"].get(model, {})
        delta = {k: now.get(k, 0) - was.get(k, 0) for k in sorted(set(now) | set(was)) if now.get(k, 0) != was.get(k, 0)}
        if delta:
            out.setdefault("batch_sizes", {})[model] = delta
            if model == DENOISER:
                out["mean_denoiser_batch"] = sum(k * v for k, v in delta.items()) / sum(delta.values())
    return out


def canvases_for(max_tokens: int, canvas_length: int) -> int:
    return math.ceil(max_tokens / canvas_length)


def served_sampler(base, sc):
    """The sampler the served canvas loop runs for this scenario's requests (the model's max_tokens,
    max_denoising_steps, ignore_eos and adaptive_stopping inputs)."""
    return base.replace(max_new_tokens=sc.max_new_tokens, max_denoising_steps=sc.steps, ignore_eos=sc.ignore_eos,
                        adaptive_stopping=sc.adaptive)


class Reference:
    """In-process generation of the same (prompt, seed) on `backend`, once each: the oracle for answers and
    the baseline of the overhead ratio. tokenize: chat-rendered ids exactly as the served model's."""

    def __init__(self, backend, tok, sampler):
        self.backend, self.tok, self.sampler, self.cache = backend, tok, sampler, {}

    def __call__(self, prompt: str, seed: int, max_new_tokens: int | None = None, fresh: bool = False) -> dict:
        """fresh: generate again even if cached (timing right before the same request goes through Triton)."""
        key = (prompt, seed, max_new_tokens)
        if fresh or key not in self.cache:
            ids = torch.tensor([self.tok.encode_chat(prompt)], device=self.backend.device)
            cfg = self.sampler if max_new_tokens is None else self.sampler.replace(max_new_tokens=max_new_tokens)
            m, res = run_generation(self.backend, ids, cfg, seed, return_result=True)
            m["text"] = self.tok.decode(res.new_tokens[0].tolist())
            self.cache[key] = m
        return self.cache[key]


def run_served_scenario(url: str, tok, cfg, base, sc, seed: int = 0, reference=None, progress: bool = True,
                        metrics_url: str | None = None) -> dict:
    """All measurements of one scenario through the model -> result dict in bench.inprocess.run_scenario's schema,
    plus `triton_overhead` (vs in-process, when `reference` is a backend) and `unobserved` (field -> reason). With
    the server's metrics endpoint, every concurrency level also reports the loop's own step time and the graph
    models' batch sizes (`server_view`)."""
    sampler = served_sampler(base, sc)
    params = {"max_tokens": sc.max_new_tokens, "max_denoising_steps": sc.steps, "ignore_eos": sc.ignore_eos,
              "adaptive_stopping": sc.adaptive}
    c_len, n_canv = cfg.canvas_length, canvases_for(sc.max_new_tokens, cfg.canvas_length)
    ref = Reference(reference, tok, sampler) if reference is not None else None
    say = (lambda msg: print(f"\r  [{sc.name}] {msg}", end="", file=sys.stderr, flush=True)) if progress else \
        (lambda msg: None)

    def judged(m: dict, prompt: str, s: int, canvases: int = n_canv, max_new: int | None = None) -> dict:
        r = ref(prompt, s, max_new) if ref else None
        m["problems"] = check_answer(m, canvases, c_len, sc.steps, r)
        m["identical_to_in_process"] = None if r is None else m.get("text") == r["text"]
        return m

    client = StreamClient(url)
    try:
        for w in range(max(1, sc.warmup)):  # full-length on both sides: first calls, allocator growth stay out
            p = text_prompt(tok, sc.prompt_tokens, seed + 1000 + w)
            client.send(p, seed, **params)
            if ref:
                ref(p, seed)
        out: dict = {"runs": []}
        pairs = []
        for r in range(sc.repeats):  # in-process first, then the same prompt and seed through Triton
            p, s = text_prompt(tok, sc.prompt_tokens, seed + r), seed + r
            rm = ref(p, s) if ref else None
            m = judged(request_metrics(client.send(p, s, **params), c_len), p, s)
            out["runs"].append(m)
            pairs.append((m, rm))
            say(f"request {r + 1}/{sc.repeats}: {m.get('e2e_tok_s') or 0:.1f} tok/s end to end")
        if sc.prompt_sweep:
            out["long_context"] = []
            for n in sc.prompt_sweep:
                p = text_prompt(tok, n, seed + n)
                m = judged(request_metrics(client.send(p, seed, **{**params, "max_tokens": c_len}), c_len), p, seed,
                           1, c_len)
                out["long_context"].append({"prompt_tokens": len(tok.encode_chat(p)), "prefill_ms": None,
                                            "step_ms_p50": None, "generation_tok_s": None,
                                            "time_to_first_canvas_ms": m["time_to_first_canvas_ms"],
                                            "problems": m["problems"]})
                say(f"prompt {n} tokens: first canvas after {m['time_to_first_canvas_ms'] or 0:.1f} ms")
        pool = [(text_prompt(tok, sc.prompt_tokens, seed + 100 + i), seed + 100 + i)
                for i in range(min(8, max(sc.batches)))] if sc.batches else []
        for i, (p, s) in enumerate(pool if ref else []):  # the sweep's oracle, timed next to the same request
            rm = ref(p, s, fresh=True)
            pairs.append((judged(request_metrics(client.send(p, s, **params), c_len), p, s), rm))
            say(f"in-process vs Triton {i + 1}/{len(pool)}")
    finally:
        client.close()
    if sc.batches:
        out["concurrency"] = []
        for level in sc.batches:
            jobs = [pool[i % len(pool)] for i in range(level * sc.rounds)]
            before = server_view(url, metrics_url)
            rows, t0, t1 = run_level(url, level, jobs, params, c_len, sc.name if progress else None)
            rows = [judged(m, *j) for m, j in zip(rows, jobs)]
            out["concurrency"].append(level_metrics(level, rows, t0, t1) | server_delta(before,
                                                                                       server_view(url, metrics_url)))
    if progress:
        print(file=sys.stderr)
    for r in out["runs"]:
        r.pop("text", None)
    out["metrics"] = summarize(out["runs"])
    out["all_correct"] = all(not t["problems"] for t, _ in pairs) and all(
        c["all_correct"] for c in out.get("concurrency", [])) and all(
        not x["problems"] for x in out.get("long_context", []))
    out["triton_overhead"] = overhead([(t, i) for t, i in pairs if i is not None]) if ref else {
        "available": False, "reason": "--no-reference: no in-process generation to compare with"}
    out["ar_baseline"] = {"available": False, "reason": "the AR baseline decodes in-process (ar_step); the Triton "
                                                        "model serves only block diffusion"}
    out["unobserved"], out["definitions"] = UNOBSERVED, DEFINITIONS
    out["served_sampler"] = {"max_new_tokens": sampler.max_new_tokens, "ignore_eos": sampler.ignore_eos,
                             "max_denoising_steps": sampler.max_denoising_steps,
                             "adaptive_stopping": sampler.adaptive_stopping}
    return out
