"""Added latency of `dgemma openai` over direct gRPC on the tiny model: N interleaved rounds of the same request
(same prompt text, seed and max_tokens) through dgemma.client.request (a new gRPC channel per request, as
`dgemma client` does), through one kept gRPC channel (a new stream per request, as the OpenAI server does), and
through the OpenAI server; medians of each and of the per-round differences. Starts tritonserver (GPU=cpu, free ports) unless --url names one; the OpenAI server runs in a thread
of this process, reached over loopback HTTP with a kept-alive connection (as the openai client does).

    PYTHONPATH=src .venv/bin/python bench/perf/openai_overhead.py [--pairs 20] [--stream] [--url host:port]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--url", help="Triton gRPC host:port (default: start one)")
    p.add_argument("--stream", action="store_true", help="stream both sides (one response per canvas)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    import queue

    import httpx
    import tritonclient.grpc as grpcclient

    from dgemma.serving.client import decode_result as _decode, encode_inputs as _inputs, request
    from dgemma.serving.openai_api import start_in_thread

    srv = None
    if args.url is None:
        from dgemma.serving.render import render
        from dgemma.serving.server import Server

        srv = Server(render("cpu", "bf16", out=tempfile.mkdtemp() + "/cpu/bf16", threads=1)).start(120)
        args.url = srv.grpc_url
    oa = start_in_thread(args.url)
    prompt, seed = "sort: 3 1 4 1 5 9 2 6 5 3", 0
    body = {"model": "dgemma", "prompt": prompt, "seed": seed, "max_tokens": args.max_tokens, "stream": args.stream}
    try:
        with httpx.Client(base_url=oa.base_url, timeout=60) as http:
            def via_openai() -> str:
                if not args.stream:
                    return http.post("/completions", json=body).json()["choices"][0]["text"]
                with http.stream("POST", "/completions", json=body) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

            values = {"text_input": "<bos>" + prompt, "seed": seed, "max_tokens": args.max_tokens,
                      "stream": True if args.stream else None}

            def via_grpc() -> str:
                out = request(args.url, **{("prompt" if k == "text_input" else k): v for k, v in values.items()})
                return "".join(r["text_output"] for r in out)

            kept = grpcclient.InferenceServerClient(args.url)

            def via_kept_channel() -> str:
                results: queue.Queue = queue.Queue()
                kept.start_stream(callback=lambda result, error: results.put((result, error)))
                kept.async_stream_infer("dgemma", _inputs(grpcclient, values), enable_empty_final_response=True)
                texts = []
                while True:
                    result, error = results.get(timeout=60)
                    assert error is None, error
                    resp = result.get_response()
                    if resp.outputs:
                        texts.append(_decode(result)["text_output"])
                    if resp.parameters["triton_final_response"].bool_param:
                        break
                kept.stop_stream()
                return "".join(texts)

            for _ in range(3):  # warm every path (channels, caches)
                assert via_openai() == via_grpc() == via_kept_channel()
            times = {"grpc_new_channel": [], "grpc_kept_channel": [], "openai": []}
            for _ in range(args.pairs):
                for name, fn in (("grpc_new_channel", via_grpc), ("grpc_kept_channel", via_kept_channel),
                                 ("openai", via_openai)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(1e3 * (time.perf_counter() - t0))
            kept.close()

        def added(base):
            d = [b - a for a, b in zip(times[base], times["openai"])]
            return {"median_ms": round(statistics.median(d), 2), "min_max_ms": [round(min(d), 2), round(max(d), 2)]}

        print(json.dumps({"rounds": args.pairs, "stream": args.stream, "max_tokens": args.max_tokens,
                          "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
                          "openai_added_vs_grpc_new_channel": added("grpc_new_channel"),
                          "openai_added_vs_grpc_kept_channel": added("grpc_kept_channel")}))
    finally:
        oa.stop()
        if srv is not None:
            srv.stop()


if __name__ == "__main__":
    main()
