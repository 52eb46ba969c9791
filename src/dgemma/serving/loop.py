"""The canvas loop of the Triton `dgemma` model, independent of Triton: `run` drives dgemma.generation.sampler for one
request and hands each response (a dict of numpy arrays, `response`; `text_response` decodes it into the model's
outputs) to `send`; `serve` wraps it for the model's per-request threads: a slot (.slots), the outcome and the
custom metrics (.metrics). `load_engine` builds the backend once per model instance through the one factory
(dgemma.runtime.factory); `model_parameters` reads and checks the rendered config. Imports torch only where it runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..core.errors import ArtifactError, Cancelled
from ..core.layout import PACKAGE
from ..generation.infill import infill_template
from ..generation.sampler import generate
from ..runtime.base import Observed
from ..runtime.factory import create
from .metrics import Recorder
from .request import Limits, Request
from .slots import Busy, Slots

# how the canvas loop computes: in-process ONNX Runtime / torch, or BLS requests to the encoder/denoiser models
BACKENDS = ("ort", "torch", "bls")
GRAPH_OF = {"encode": "encoder", "denoise": "denoiser"}  # backend call -> the graph label of dgemma_graph_seconds


def response(new_ids, canvas_index: int, canvases: int, steps: list[int], tokens_per_forward: float,
             draft: bool = False) -> dict:
    """The loop's tensors for one response (output_ids still token ids; text_response decodes them)."""
    return {
        "is_draft": np.array([draft], dtype=np.bool_),
        "output_ids": np.asarray(new_ids, dtype=np.int64).reshape(-1),
        "canvas_index": np.array([canvas_index], dtype=np.int32),
        "canvases": np.array([canvases], dtype=np.int32),
        "steps_per_canvas": np.asarray(steps or [0], dtype=np.int32),
        "tokens_per_forward": np.array([tokens_per_forward], dtype=np.float32),
    }


def text_response(tensors: dict, tokenizer) -> dict:
    """A `response` with its output_ids decoded: the model's OUTPUTS."""
    out = dict(tensors)
    text = tokenizer.decode(out.pop("output_ids").tolist())
    return {"text_output": np.array([text.encode("utf-8")], dtype=np.object_), **out}


def run(backend, sampler, tokenizer, req: Request, send: Callable[[dict], None],
        should_stop: Callable[[], bool] | None = None,
        on_commit: Callable[[int, int], None] | None = None) -> None:
    """Generate for one request; stream=True sends one response per committed canvas (only its tokens),
    otherwise exactly one response with all new tokens. on_commit(canvas index, steps it took) after every
    commit. Raises Cancelled when should_stop() turns true (polled before every denoising step)."""
    cfg = sampler.replace(max_new_tokens=req.max_tokens, max_denoising_steps=req.max_denoising_steps,
                          entropy_bound=req.entropy_bound, ignore_eos=req.ignore_eos, t_min=req.t_min,
                          t_max=req.t_max, adaptive_stopping=req.adaptive_stopping)
    template = None
    if req.infill is not None:
        template = infill_template(tokenizer, req.infill, backend.canvas_length, cfg.max_new_tokens)
    steps: list[int] = []

    def on_step(ev):
        if ev.canvas == len(steps):
            steps.append(0)
        steps[ev.canvas] = ev.step
        if req.stream and req.stream_drafts:
            send(response(ev.draft[0].tolist(), ev.canvas, ev.canvas, list(steps), 0.0, draft=True))

    def on_canvas(i, committed):
        if on_commit is not None:
            on_commit(i, steps[i])
        if req.stream:
            send(response(committed[0].tolist(), i, i + 1, list(steps), 0.0))

    prompt = torch.tensor([req.input_ids], dtype=torch.int64, device=backend.device)
    res = generate(backend, prompt, cfg, torch.Generator(device=backend.device).manual_seed(req.seed),
                   on_step=on_step, should_stop=should_stop, on_canvas=on_canvas,
                   template=None if template is None else template.to(backend.device))
    tpf = float(res.tokens_per_forward[0])
    if req.stream:  # a last empty response carries the final statistics
        send(response([], res.canvases, res.canvases, res.steps_per_canvas, tpf))
    else:
        send(response(res.new_tokens[0].tolist(), 0, res.canvases, res.steps_per_canvas, tpf))


def model_parameters(args: dict) -> dict[str, str]:
    """config.pbtxt `parameters` as {key: string} from the args Triton passes to initialize(); checks that the
    repository was rendered for this dgemma version."""
    cfg = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    if params.get("dgemma_version") != __version__:
        raise ArtifactError(f"model {cfg.get('name')!r} was rendered for dgemma {params.get('dgemma_version')!r}; "
                            f"the server's environment has {__version__}. Re-render: make repo.")
    here = PACKAGE.parent
    if params.get("dgemma_src") and Path(params["dgemma_src"]).resolve() != here:
        raise ArtifactError(f"model {cfg.get('name')!r} was rendered from the dgemma in {params['dgemma_src']}, but "
                            f"the stub imported {here} (model.py's sys.path header missing?). Re-render: make repo.")
    return params


def load_engine(params: dict[str, str], pb_utils=None, device_id: int | None = None):
    """The model instance's Engine (backend, sampler defaults, tokenizer; dgemma.runtime.factory), built once in
    initialize() from the rendered parameters: `backend` ort | torch in-process, or bls to the graph models."""
    threads = int(params["threads"]) if params.get("threads") else None
    if threads:
        torch.set_num_threads(threads)
    limits = Limits.from_parameters(params)
    gpu, precision = limits.target.split("/")
    kind = params.get("backend", "torch")
    on_gpu = torch.cuda.is_available() and (kind != "bls" or params.get("engine") in ("tensorrt", "torch"))
    device = (f"cuda:{device_id}" if device_id is not None else "cuda") if on_gpu else "cpu"
    return create(kind, params["graph_precision"] if kind == "bls" else precision, gpu, params["checkpoint"],
                  device=device, max_context=limits.max_context, threads=threads,
                  onnx_dir=params.get("onnx_dir") or None, pb_utils=pb_utils)


def serve(engine, req: Request, send: Callable[[dict], None], should_stop: Callable[[], bool], slots: Slots,
          recorder: Recorder, log: Callable[[str], None] = lambda s: None) -> str:
    """One request on the model's per-request thread: wait for a slot, generate, free the slot, record.
    -> outcome ("ok", "cancelled"); DgemmaErrors (bad request, Busy) and bugs propagate after recording."""
    committed = 0
    outcome = "error"

    def on_commit(i, steps):
        nonlocal committed
        committed = i + 1
        recorder.canvas(steps)

    t0 = time.perf_counter()
    try:
        slots.acquire(should_stop, on_queued=lambda: recorder.occupancy(slots))
    except Busy:
        recorder.finished(None, "busy", slots)
        raise
    except Cancelled:
        recorder.finished(0, "cancelled", slots)
        return "cancelled"
    recorder.occupancy(slots)
    try:
        backend = Observed(engine.backend, lambda kind, t0, t1: recorder.graph_call(GRAPH_OF[kind], t1 - t0))
        run(backend, engine.sampler, engine.tokenizer, req, send, should_stop, on_commit)
        outcome = "ok"
    except Cancelled as e:
        outcome = "cancelled"
        log(f"dgemma: {e} after {committed} committed canvas(es), {time.perf_counter() - t0:.3f} s; "
            "slot freed")
    finally:
        slots.release()
        recorder.finished(committed, outcome, slots)
    return outcome
