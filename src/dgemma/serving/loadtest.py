"""`dgemma loadtest`: the serving overhead and concurrency figures of the README, measured on a real tritonserver.

For each canvas loop backend (in-process ort / torch, bls through the encoder/denoiser models) it renders the
repository for GPU=cpu, starts the server, and for each concurrency level C runs C client threads that send
streamed gRPC requests back to back (distinct "sort: ..." prompts, fixed seeds). Per level: latency (mean, p50,
p90), requests/s and generated words/s, the loop's own per-call time (dgemma_graph_seconds: one denoising
step, BLS round trip included) and the denoiser model's batch sizes from Triton's statistics (executions per
batch size). The in-process baseline runs the same prompts through dgemma.sampler.generate over OrtBackend.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def prompts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    return [("sort: " + " ".join(map(str, rng.integers(0, 10, 10))), i) for i in range(n)]


def parse_metrics(text: str, prefixes: tuple[str, ...] = ("dgemma_", "nv_inference_")) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for the series whose names start with `prefixes`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
    return out


def metric(m: dict[str, float], name: str, **labels) -> float:
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for key, v in m.items():
        base, _, lab = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', lab))
        if all(have.get(k) == str(x) for k, x in labels.items()):
            total += v
    return total


def batch_counts(url: str, model: str = "denoiser") -> dict[int, int]:
    """{batch size: executions} from Triton's statistics for `model` ({} when the repository does not serve it)."""
    from ..client import stats

    return stats(url).get(model, {}).get("batches", {})


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_level(srv, jobs: list[tuple[str, int]], concurrency: int, **params) -> dict:
    from ..client import request

    lat, toks, errors = [], [], []
    lock = threading.Lock()
    queue = list(jobs)
    m0, b0 = parse_metrics(srv.metrics()), batch_counts(srv.grpc_url)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                prompt, seed = queue.pop(0)
            t0 = time.perf_counter()
            try:
                out = request(srv.grpc_url, prompt, seed=seed, stream=True, **params)
            except Exception as e:  # reported in the result
                with lock:
                    errors.append(str(e))
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                toks.append(sum(len(r["text_output"].split()) for r in out))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    m1, b1 = parse_metrics(srv.metrics()), batch_counts(srv.grpc_url)
    steps = metric(m1, "dgemma_graph_seconds_count", graph="denoiser") - \
        metric(m0, "dgemma_graph_seconds_count", graph="denoiser")
    step_s = metric(m1, "dgemma_graph_seconds_sum", graph="denoiser") - \
        metric(m0, "dgemma_graph_seconds_sum", graph="denoiser")
    batches = {k: b1.get(k, 0) - b0.get(k, 0) for k in sorted(set(b1) | set(b0)) if b1.get(k, 0) - b0.get(k, 0)}
    n_exec = sum(batches.values())
    return {
        "concurrency": concurrency, "requests": len(lat), "errors": errors[:3], "wall_s": round(wall, 3),
        "req_per_s": round(len(lat) / wall, 2), "words_per_s": round(sum(toks) / wall, 1),
        "latency_ms": {"mean": round(1e3 * statistics.fmean(lat), 1) if lat else None,
                       "p50": round(1e3 * _pct(lat, 50), 1), "p90": round(1e3 * _pct(lat, 90), 1)},
        "denoise_steps": int(steps), "step_ms_in_loop": round(1e3 * step_s / steps, 3) if steps else None,
        "denoiser_batches": batches,
        "mean_denoiser_batch": round(sum(k * v for k, v in batches.items()) / n_exec, 2) if n_exec else None,
    }


def _local_engine():
    """(OrtBackend over build/onnx/fp32 with the cpu profile's capacity, sampler defaults, tokenizer), 1 thread."""
    import torch

    from ..checkpoint import load_checkpoint
    from ..export import DEFAULT_OUT
    from ..profiles import resolve
    from ..runtime.ort_backend import OrtBackend
    from ..tiny import ensure_tiny
    from ..tokens import Tokenizer

    torch.set_num_threads(1)
    ck = ensure_tiny()
    backend = OrtBackend(DEFAULT_OUT / "fp32", checkpoint=ck, max_context=resolve("cpu", "bf16").gpu.max_context,
                         threads=1)
    return backend, load_checkpoint(ck).sampler, Tokenizer(ck)


def _generate_local(engine, prompt: str, seed: int, timed=None, **params):
    import torch

    from ..sampler import generate

    backend, sampler, tok = engine
    cfg = sampler.replace(max_new_tokens=params.get("max_tokens", sampler.max_new_tokens),
                          ignore_eos=bool(params.get("ignore_eos")),
                          max_denoising_steps=params.get("max_denoising_steps") or sampler.max_denoising_steps)
    return generate(timed or backend, torch.tensor([tok.encode_chat(prompt)]), cfg,
                    torch.Generator().manual_seed(seed))


def inprocess(jobs: list[tuple[str, int]], **params) -> dict:
    """The same prompts through dgemma.sampler.generate over OrtBackend in this process (1 thread)."""
    from ..runtime.base import BackendWrapper

    engine = _local_engine()
    times: list[float] = []

    class Timed(BackendWrapper):
        def denoise(self, *a):
            t0 = time.perf_counter()
            out = self.inner.denoise(*a)
            times.append(time.perf_counter() - t0)
            return out

    timed = Timed(engine[0])
    lat = []
    for prompt, seed in jobs[:2]:  # warm-up
        _generate_local(engine, prompt, seed, timed, **params)
    times.clear()
    for prompt, seed in jobs:
        t0 = time.perf_counter()
        _generate_local(engine, prompt, seed, timed, **params)
        lat.append(time.perf_counter() - t0)
    return {"requests": len(lat), "latency_ms": {"mean": round(1e3 * statistics.fmean(lat), 1),
                                                  "p50": round(1e3 * _pct(lat, 50), 1)},
            "denoise_steps": len(times), "step_ms": round(1e3 * statistics.fmean(times), 3)}


def paired(srv, jobs: list[tuple[str, int]], rounds: int = 1, **params) -> dict:
    """Per request, in-process generation then the same request to the server, alternating (a shared 2-core box
    drifts; pairs cancel the drift): median of (server - in-process) per request and per denoising step."""
    from ..client import request

    engine = _local_engine()
    diffs, local, remote, steps = [], [], [], []
    for prompt, seed in jobs[:2]:  # warm-up
        _generate_local(engine, prompt, seed, **params)
        request(srv.grpc_url, prompt, seed=seed, **params)
    for _ in range(rounds):
        for prompt, seed in jobs:
            t0 = time.perf_counter()
            res = _generate_local(engine, prompt, seed, **params)
            t1 = time.perf_counter()
            out = request(srv.grpc_url, prompt, seed=seed, **params)[-1]
            t2 = time.perf_counter()
            assert out["steps_per_canvas"] == res.steps_per_canvas, "server and in-process runs diverged"
            local.append(t1 - t0)
            remote.append(t2 - t1)
            diffs.append((t2 - t1) - (t1 - t0))
            steps.append(sum(res.steps_per_canvas))
    per_step = [d / n for d, n in zip(diffs, steps)]
    return {"requests": len(diffs), "mean_steps": round(statistics.fmean(steps), 1),
            "inprocess_ms_p50": round(1e3 * statistics.median(local), 1),
            "server_ms_p50": round(1e3 * statistics.median(remote), 1),
            "overhead_ms_per_request_p50": round(1e3 * statistics.median(diffs), 1),
            "overhead_ms_per_step_p50": round(1e3 * statistics.median(per_step), 3),
            "server_over_inprocess_p50": round(statistics.median(r / x for r, x in zip(remote, local)), 3)}


def loadtest(backends=("ort", "bls"), levels=(1, 2, 4, 8), requests_per_level: int = 16, max_batch: int | None = None,
             max_tokens: int = 96, ignore_eos: bool = True, out: str | Path | None = None,
             queue_delay_us: int | None = None, skip_inprocess: bool = False, pairs: int = 0,
             steps: int | None = None) -> dict:
    from .render import render
    from .server import Server

    params = {"max_tokens": max_tokens, "ignore_eos": ignore_eos or None, "max_denoising_steps": steps}
    jobs = prompts(max(requests_per_level, max(levels)))
    result = {"params": params, "max_batch": max_batch, "queue_delay_us": queue_delay_us, "servers": {}}
    if not skip_inprocess:
        result["inprocess_ort"] = inprocess(jobs, **params)
        print(f"in-process ort: {result['inprocess_ort']}", flush=True)
    for backend in backends:
        extra = {} if queue_delay_us is None else {"queue_delay_us": queue_delay_us}
        root = render("cpu", "bf16", backend=backend, threads=1, max_batch=max_batch,
                      out=Path("build") / "loadtest" / backend, **extra)
        with Server(root) as srv:
            if pairs:
                pr = paired(srv, jobs[:pairs], **params)
                print(f"{backend} paired with in-process ort: {json.dumps(pr)}", flush=True)
                result.setdefault("paired", {})[backend] = pr
            run_level(srv, jobs[:2], 1, **params)  # warm-up
            levels_out = []
            for c in levels if levels != (0,) else ():
                r = run_level(srv, jobs[:max(requests_per_level, c)], c, **params)
                print(f"{backend} C={c}: {json.dumps(r)}", flush=True)
                levels_out.append(r)
        result["servers"][backend] = levels_out
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def cmd_loadtest(args) -> int:
    levels = tuple(int(x) for x in args.concurrency.split(","))
    loadtest(tuple(args.backends.split(",")), levels, args.requests, args.max_batch, args.max_tokens,
             not args.stop_at_eos, args.out, args.queue_delay_us, args.skip_inprocess, args.pairs, args.steps)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("loadtest", help="serving overhead and concurrency on a real tritonserver (GPU=cpu, tiny)")
    p.add_argument("--backends", default="ort,bls", help="canvas loop backends to compare")
    p.add_argument("--concurrency", default="1,2,4,8", help="levels; 0 = none (only --pairs)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-batch", type=int, help="override GpuProfile.max_batch (slots, graphs' max_batch_size)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--stop-at-eos", action="store_true", help="default: ignore_eos (fixed work per request)")
    p.add_argument("--steps", type=int, help="max_denoising_steps per canvas (1: isolates the per-request cost)")
    p.add_argument("--queue-delay-us", type=int, help="dynamic batcher max_queue_delay_microseconds (encoder, denoiser)")
    p.add_argument("--skip-inprocess", action="store_true", help="no in-process baseline")
    p.add_argument("--pairs", type=int, default=0,
                   help="first measure N requests alternating in-process / server (overhead per request and step)")
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(func=cmd_loadtest)
