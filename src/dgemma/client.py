"""`dgemma client`: talk to the `dgemma` ensemble over gRPC with tritonclient.

The model is decoupled: plain infer is refused and every call goes through the streaming API (start_stream /
async_stream_infer), toolchain.md §3.3b. `request()` returns
every response in order (one per committed canvas when stream=True, exactly one otherwise)."""

from __future__ import annotations

import json
import queue
import sys

import numpy as np

from .errors import DgemmaError

DTYPES = {"TYPE_STRING": ("BYTES", np.object_), "TYPE_INT32": ("INT32", np.int32),
          "TYPE_INT64": ("INT64", np.int64), "TYPE_BOOL": ("BOOL", np.bool_), "TYPE_FP32": ("FP32", np.float32)}


class ServerError(DgemmaError):
    """The server answered a request with an error (its message names the value and the limit)."""


def _inputs(grpcclient, values: dict):
    from .serving.canvas_loop import INPUTS

    out = []
    for name, v in values.items():
        if v is None:
            continue
        dtype = INPUTS[name][0] if name in INPUTS else ("TYPE_STRING" if isinstance(v, str) else "TYPE_INT32")
        tname, np_dtype = DTYPES[dtype]
        arr = np.array([v.encode("utf-8") if isinstance(v, str) else v], dtype=np_dtype)
        t = grpcclient.InferInput(name, [1], tname)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def request(url: str, prompt: str, model: str = "dgemma", timeout_s: float = 120.0, **params) -> list[dict]:
    """One request through gRPC streaming; -> [{text_output, canvas_index, canvases, steps_per_canvas,
    tokens_per_forward}] in arrival order. Raises ServerError with the server's message."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, _inputs(grpcclient, {"text_input": prompt, **params}),
                                  enable_empty_final_response=True)
        out = []
        while True:
            try:
                result, error = results.get(timeout=timeout_s)
            except queue.Empty:
                raise ServerError(f"no response from {url} within {timeout_s:.0f} s") from None
            if error is not None:
                raise ServerError(str(error))
            resp = result.get_response()
            if resp.outputs:
                out.append(_decode(result))
            if resp.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def _decode(result) -> dict:
    d = {"text_output": result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")}
    for name in ("canvas_index", "canvases"):
        d[name] = int(result.as_numpy(name).reshape(-1)[0])
    d["steps_per_canvas"] = result.as_numpy("steps_per_canvas").reshape(-1).tolist()
    d["tokens_per_forward"] = round(float(result.as_numpy("tokens_per_forward").reshape(-1)[0]), 4)
    d["is_draft"] = bool(result.as_numpy("is_draft").reshape(-1)[0])
    return d


def served_models(c) -> list[str]:
    """The dgemma models this server's repository holds (encoder/denoiser only where rendered), in MODELS order."""
    from .serving.render import MODELS

    names = {m["name"] for m in c.get_model_repository_index(as_json=True).get("models", [])}
    return [m for m in MODELS if m in names]


def health(url: str) -> dict:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    try:
        return {"live": c.is_server_live(), "ready": c.is_server_ready(),
                "models": {m: c.is_model_ready(m) for m in served_models(c)}}
    except Exception as e:  # tritonclient raises InferenceServerException for a refused connection
        raise ServerError(f"no Triton server at {url} ({e}). Start one with: dgemma serve") from None
    finally:
        c.close()


def stats(url: str) -> dict:
    """Per model: requests, executions and executions by batch size (Triton's statistics over gRPC)."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    try:
        out = {}
        for m in served_models(c):
            st = c.get_inference_statistics(m, as_json=True)["model_stats"][0]
            out[m] = {"requests": int(st.get("inference_count", 0)), "executions": int(st.get("execution_count", 0)),
                      "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"])
                                  for b in st.get("batch_stats", [])}}
        return out
    except Exception as e:  # tritonclient raises InferenceServerException for a refused connection
        raise ServerError(f"no statistics from {url} ({e}). Start a server with: dgemma serve") from None
    finally:
        c.close()


def cmd_client(args) -> int:
    if args.stats:
        s = stats(args.url)
        if args.json:
            print(json.dumps(s))
        else:
            for m, v in s.items():
                sizes = ", ".join(f"{n}x{k}" for k, n in sorted(v["batches"].items())) or "-"
                print(f"{m:<9} {v['requests']:6d} requests {v['executions']:6d} executions  batch sizes: {sizes}")
        return 0
    if args.health:
        h = health(args.url)
        print(json.dumps(h) if args.json else
              f"{args.url}: live={h['live']} ready={h['ready']} " + " ".join(f"{k}={v}" for k, v in h["models"].items()))
        return 0 if h["ready"] else 1
    if args.prompt is None:
        raise DgemmaError("pass --prompt TEXT (or --health).")
    params = {"max_tokens": args.max_tokens, "seed": args.seed, "stream": True if args.stream else None,
              "max_denoising_steps": args.steps, "entropy_bound": args.entropy_bound, "infill": args.infill,
              "ignore_eos": True if args.ignore_eos else None, "temperature_min": args.t_min,
              "temperature_max": args.t_max, "adaptive_stopping": False if args.fixed_steps else None,
              "stream_drafts": True if args.drafts else None}
    if args.drafts and not args.stream:
        raise DgemmaError("--drafts streams a draft per denoising step; add --stream.")
    try:
        responses = request(args.url, args.prompt, model=args.model, **params)
    except ServerError:
        raise
    except Exception as e:
        raise ServerError(f"request to {args.url} failed ({e}). Is the server up? dgemma client --health") from None
    if args.json:
        print(json.dumps(responses if args.stream else responses[-1]))
    elif args.stream:
        for r in responses:
            if r["is_draft"]:
                print(f"  (draft {r['canvas_index'] + 1}.{r['steps_per_canvas'][-1]}) {r['text_output']}", flush=True)
            elif r["text_output"]:
                print(f"[canvas {r['canvas_index'] + 1}] {r['text_output']}", flush=True)
        last = responses[-1]
        print(f"-- steps per canvas {last['steps_per_canvas']}, tokens per forward {last['tokens_per_forward']}",
              file=sys.stderr)
    else:
        print(responses[-1]["text_output"])
    return 0


def add_parsers(sub) -> None:
    c = sub.add_parser("client", help="send a prompt to the Triton `dgemma` ensemble over gRPC (or --health)")
    c.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port (dgemma serve prints it)")
    c.add_argument("--prompt")
    c.add_argument("--health", action="store_true", help="server and model readiness")
    c.add_argument("--stats", action="store_true",
                   help="per model: requests, executions, batch sizes (executions x size) from Triton's statistics")
    c.add_argument("--stream", action="store_true", help="one response per committed canvas")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--steps", type=int, help="max_denoising_steps")
    c.add_argument("--entropy-bound", type=float)
    c.add_argument("--infill")
    c.add_argument("--ignore-eos", action="store_true", help="always fill max_tokens (benchmarks)")
    c.add_argument("--t-min", type=float, help="temperature_min of the denoising schedule")
    c.add_argument("--t-max", type=float, help="temperature_max of the denoising schedule")
    c.add_argument("--fixed-steps", action="store_true", help="adaptive_stopping=false: always --steps steps")
    c.add_argument("--drafts", action="store_true", help="with --stream: also print each denoising step's draft")
    c.add_argument("--model", default="dgemma")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_client)
