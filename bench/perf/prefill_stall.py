"""How long a long prompt's prefill stalls the requests that are denoising (issue 17), for several prefill chunks.

One request is denoising (fixed steps, no adaptive stop) when a request with a long prompt joins the in-flight
batch (dgemma.generation.batch.InFlight, the serving scheduler's core). Each iteration runs the encoder over the
newcomer's next chunk, then the batched denoising step, so the denoising request waits one chunk's encoder pass
per step. Printed per chunk size: the denoising request's step interval before the join (median) and while the
prompt prefills (median and max), the time each of its steps gains meanwhile (median during - before) and the
prefill's total time, all measured in one run (the best of --repeats runs per chunk, against CPU noise).

    PYTHONPATH=src .venv/bin/python bench/perf/prefill_stall.py [--prompt 2048] [--chunks 64,256,1024,whole]
        [--backend torch|ort] [--checkpoint DIR]

The tiny model on the CPU by default (its figures show the mechanism, not a GPU's); on a GPU pass --checkpoint
synthetic --device cuda for full-size shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def run(engine, prompt_len: int, chunk: int, seed: int = 0) -> dict:
    from dgemma.generation.batch import InFlight, Row
    from dgemma.generation.sampler import Generation, Rng, stats_for

    b = engine.backend
    gen = torch.Generator().manual_seed(seed)

    def row(n_prompt: int, max_new: int) -> Row:
        ids = torch.randint(3, b.vocab_size, (1, n_prompt), generator=gen).to(b.device)
        cfg = engine.sampler.replace(max_new_tokens=max_new, max_denoising_steps=16, adaptive_stopping=False,
                                     ignore_eos=True)
        g = Generation(ids, cfg, Rng([torch.Generator(device=b.device).manual_seed(seed)]), b.canvas_length,
                       b.vocab_size, None, None, None, stats_for(b.device))
        return Row(g, ids)

    flight = InFlight(b, 2, chunk)
    busy = flight.add(row(16, 16 * b.canvas_length))

    def tick() -> float:
        t0 = time.perf_counter()
        flight.step()
        if b.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(3):  # prompt, warm-up steps
        tick()
    before = [tick() for _ in range(10)]
    long = flight.add(row(prompt_len, b.canvas_length))
    during, t0 = [], time.perf_counter()
    while long.gen.phase == "encode" and long.gen.ci == 0:
        during.append(tick())
    prefill_s = time.perf_counter() - t0
    assert busy in flight.rows
    base = statistics.median(before)
    return {"chunk": chunk, "iterations": len(during), "step_ms_before": 1e3 * base,
            "step_ms_during": 1e3 * statistics.median(during), "step_ms_max_during": 1e3 * max(during),
            "stall_ms": 1e3 * (statistics.median(during) - base), "prefill_ms": 1e3 * prefill_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--chunks", default="64,256,1024,whole")
    p.add_argument("--backend", default="torch", choices=("torch", "ort"))
    p.add_argument("--checkpoint")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="runs per chunk; the one with the smallest max is shown")
    args = p.parse_args()
    from dgemma.runtime.factory import create

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = create(args.backend, "fp32" if args.backend == "ort" else "bf16", None, args.checkpoint,
                    device=args.device, max_context=args.prompt + 1024, dtype=None if args.device else "float32",
                    batched=True)
    chunks = [args.prompt if c == "whole" else int(c) for c in args.chunks.split(",")]
    print(f"{args.backend} on {engine.backend.device}, prompt {args.prompt} tokens joining a denoising request")
    print("| prefill chunk | iterations | step ms before | step ms during prefill (p50 / max) | added per step ms "
          "| prefill ms |")
    print("|---|---|---|---|---|---|")
    for c in chunks:
        r = min((run(engine, args.prompt, c) for _ in range(args.repeats)), key=lambda x: x["step_ms_max_during"])
        print(f"| {c} | {r['iterations']} | {r['step_ms_before']:.1f} | {r['step_ms_during']:.1f} / "
              f"{r['step_ms_max_during']:.1f} | {r['stall_ms']:.1f} | {r['prefill_ms']:.0f} |")


if __name__ == "__main__":
    main()
