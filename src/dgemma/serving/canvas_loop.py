"""Requests and responses of the Triton `dgemma` model, independent of Triton.

`Limits` holds what a rendered repository allows (from the GpuProfile and the checkpoint, written into
config.pbtxt parameters by render.py). `parse_request` turns the ensemble's LLM-shaped inputs (numpy arrays by
name) into a validated `Request` or raises `RequestError` naming the value, the limit and where it comes from.
`run` drives `dgemma.sampler.generate` for one request and hands each response (a dict of numpy arrays) to
`send` (`text_response` decodes it into the model's outputs); `serve` wraps it for the model's per-request
threads: a slot (`Slots`, GpuProfile.max_batch canvases in flight, FIFO queue beyond), the outcome and the
custom metrics (`METRICS`, reported through `Recorder`). Imports torch only where it runs the loop.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import Cancelled, RequestError

# how the canvas loop computes: in-process ONNX Runtime / torch, or BLS requests to the encoder/denoiser models
BACKENDS = ("ort", "torch", "bls")

# model inputs (name -> (Triton dtype, optional)); the config template and the client use these names
INPUTS = {
    "text_input": ("TYPE_STRING", False),
    "max_tokens": ("TYPE_INT32", True),
    "seed": ("TYPE_INT64", True),
    "stream": ("TYPE_BOOL", True),
    "max_denoising_steps": ("TYPE_INT32", True),
    "entropy_bound": ("TYPE_FP32", True),
    "ignore_eos": ("TYPE_BOOL", True),
    "infill": ("TYPE_STRING", True),
    "temperature_min": ("TYPE_FP32", True),  # the denoising temperature range, T(n) from max down to min
    "temperature_max": ("TYPE_FP32", True),
    "adaptive_stopping": ("TYPE_BOOL", True),  # false: always max_denoising_steps (the vLLM anchor setting)
    "stream_drafts": ("TYPE_BOOL", True),  # with stream: also a draft (the argmax canvas) after every step
    "exclude_input_in_output": ("TYPE_BOOL", True),  # sent by genai-perf; the prompt is never echoed anyway
}
# model outputs (name -> (Triton dtype, dims))
OUTPUTS = {
    "text_output": ("TYPE_STRING", 1),
    "canvas_index": ("TYPE_INT32", 1),
    "canvases": ("TYPE_INT32", 1),
    "steps_per_canvas": ("TYPE_INT32", -1),
    "tokens_per_forward": ("TYPE_FP32", 1),
    "is_draft": ("TYPE_BOOL", 1),  # true: a denoising step's draft of canvas canvas_index, not committed text
}


@dataclass(frozen=True)
class Limits:
    """What one rendered repository accepts; every field names its source in error messages."""

    target: str  # "<gpu>/<precision>"
    max_prompt: int  # GpuProfile.max_prompt
    max_context: int  # GpuProfile.max_context (prompt + output tokens)
    canvas_length: int  # checkpoint config.json
    max_denoising_steps: int  # checkpoint generation_config.json
    default_max_tokens: int  # checkpoint generation_config.json max_new_tokens
    default_entropy_bound: float
    default_t_min: float = 0.4  # checkpoint generation_config.json sampler_config
    default_t_max: float = 0.8

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "Limits":
        """From a model config's `parameters` (string values, as Triton hands them to initialize())."""
        try:
            return cls(target=params["target"], max_prompt=int(params["max_prompt"]),
                       max_context=int(params["max_context"]), canvas_length=int(params["canvas_length"]),
                       max_denoising_steps=int(params["max_denoising_steps"]),
                       default_max_tokens=int(params["default_max_tokens"]),
                       default_entropy_bound=float(params["default_entropy_bound"]),
                       default_t_min=float(params["default_t_min"]), default_t_max=float(params["default_t_max"]))
        except KeyError as e:
            raise RequestError(f"model config lacks parameter {e}; re-render with `make repo`.") from None


@dataclass(frozen=True)
class Request:
    input_ids: tuple[int, ...]
    max_tokens: int
    seed: int
    stream: bool
    max_denoising_steps: int
    entropy_bound: float
    ignore_eos: bool
    infill: str | None = None
    t_min: float = 0.4
    t_max: float = 0.8
    adaptive_stopping: bool = True
    stream_drafts: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str | bytes) -> "Request":
        d = json.loads(s)
        d["input_ids"] = tuple(d["input_ids"])
        return cls(**d)


def _scalar(inputs: dict[str, Any], name: str):
    """The single element of an optional input, or None when absent."""
    a = inputs.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise RequestError(f"{name} must hold exactly one value (got {a.size}: shape {list(a.shape)}).")
    v = a.reshape(-1)[0]
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v


def _int(name: str, v, lo: int, hi: int | None, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise RequestError(f"{name} must be an integer (got {v!r}).")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise RequestError(f"{name} must be an integer {rng} (got {v}){'; ' + source if source else ''}.")
    return v


def parse_request(inputs: dict[str, Any], limits: Limits, encode_chat: Callable[[str], list[int]]) -> Request:
    """Validate the ensemble inputs against `limits`; `encode_chat` renders and tokenizes the user text."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown input(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(INPUTS)}.")
    text = _scalar(inputs, "text_input")
    if text is None or not isinstance(text, str) or not text.strip():
        raise RequestError(f"text_input is empty (got {text!r}); give some text to answer.")
    ids = list(encode_chat(text))
    if len(ids) > limits.max_prompt:
        raise RequestError(f"prompt has {len(ids)} tokens; {limits.target} holds at most {limits.max_prompt} prompt "
                           "tokens (GpuProfile.max_prompt). Shorten the prompt.")
    c = limits.canvas_length
    room = (limits.max_context - len(ids)) // c * c  # whole canvases that still fit
    mt = _scalar(inputs, "max_tokens")
    if mt is None:
        mt = min(limits.default_max_tokens, max(room, c))
    mt = _int("max_tokens", mt, 1, None, f"output comes in whole {c}-token canvases")
    n_canvases = math.ceil(mt / c)
    total = len(ids) + n_canvases * c
    if total > limits.max_context:
        raise RequestError(
            f"max_tokens={mt} needs {n_canvases} canvas(es) of {c}: prompt {len(ids)} + {n_canvases * c} = {total} "
            f"tokens; {limits.target} holds at most {limits.max_context} prompt+output tokens "
            f"(GpuProfile.max_context). Use max_tokens <= {max(room, 0)} for this prompt.")
    seed = _scalar(inputs, "seed")
    seed = 0 if seed is None else _int("seed", seed, 0, 2**63 - 1, "")
    stream = _scalar(inputs, "stream")
    steps = _scalar(inputs, "max_denoising_steps")
    steps = limits.max_denoising_steps if steps is None else _int(
        "max_denoising_steps", steps, 1, limits.max_denoising_steps,
        "the checkpoint's generation_config.json sets the maximum")
    eb = _scalar(inputs, "entropy_bound")
    if eb is None:
        eb = limits.default_entropy_bound
    elif isinstance(eb, bool) or not isinstance(eb, (int, float)) or not math.isfinite(eb) or eb <= 0:
        raise RequestError(f"entropy_bound must be a finite number > 0 (got {eb!r}); the checkpoint default is "
                           f"{limits.default_entropy_bound} (generation_config.json sampler_config).")
    infill = _scalar(inputs, "infill")
    if infill is not None and (not isinstance(infill, str) or "_" not in infill):
        raise RequestError(f"infill must be a canvas template with at least one '_' hole (got {infill!r}).")
    t_min, t_max = _scalar(inputs, "temperature_min"), _scalar(inputs, "temperature_max")
    t_min = limits.default_t_min if t_min is None else t_min
    t_max = limits.default_t_max if t_max is None else t_max
    for name, v in (("temperature_min", t_min), ("temperature_max", t_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise RequestError(f"{name} must be a finite number >= 0 (got {v!r}).")
    if t_max <= t_min:
        raise RequestError(f"temperature range must have temperature_min < temperature_max (got {t_min:.6g} and {t_max:.6g}; "
                           f"the checkpoint's defaults are {limits.default_t_min} and {limits.default_t_max}, "
                           "generation_config.json sampler_config).")
    adaptive = _scalar(inputs, "adaptive_stopping")
    return Request(tuple(int(i) for i in ids), mt, seed, bool(stream), steps, float(eb),
                   bool(_scalar(inputs, "ignore_eos")), infill, float(t_min), float(t_max),
                   True if adaptive is None else bool(adaptive), bool(_scalar(inputs, "stream_drafts")))


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
    import torch

    from ..cli import infill_template
    from ..sampler import generate

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
    from .. import __version__
    from ..errors import ArtifactError

    cfg = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    if params.get("dgemma_version") != __version__:
        raise ArtifactError(f"model {cfg.get('name')!r} was rendered for dgemma {params.get('dgemma_version')!r}; "
                            f"the server's environment has {__version__}. Re-render: make repo.")
    from pathlib import Path

    import dgemma

    here = Path(dgemma.__file__).resolve().parents[1]
    if params.get("dgemma_src") and Path(params["dgemma_src"]).resolve() != here:
        raise ArtifactError(f"model {cfg.get('name')!r} was rendered from the dgemma in {params['dgemma_src']}, but "
                            f"the stub imported {here} (model.py's sys.path header missing?). Re-render: make repo.")
    return params


def build_engine(params: dict[str, str]):
    """(backend, sampler defaults, tokenizer) for the model's initialize(): built once per model instance."""
    from pathlib import Path

    import torch

    from ..checkpoint import load_checkpoint
    from ..tokens import Tokenizer

    if params.get("threads"):
        torch.set_num_threads(int(params["threads"]))
    limits = Limits.from_parameters(params)
    ck_dir = Path(params["checkpoint"])
    ck = load_checkpoint(ck_dir)
    name = params.get("backend", "torch")
    threads = int(params["threads"]) if params.get("threads") else None
    if name == "ort":
        from ..runtime.ort_backend import OrtBackend

        backend = OrtBackend(params["onnx_dir"], checkpoint=ck_dir, max_context=limits.max_context, cfg=ck.config,
                             threads=threads)
    elif name == "bls":
        from ..runtime.bls_backend import BlsBackend

        device = "cuda" if params.get("engine") in ("tensorrt", "torch") and torch.cuda.is_available() else "cpu"
        backend = BlsBackend(ck.config, params["graph_precision"], max_context=limits.max_context, device=device,
                             target=limits.target)
    else:
        from ..runtime.torch_backend import TorchBackend

        backend = TorchBackend(ck.model, max_context=limits.max_context)
    return backend, ck.sampler, Tokenizer(ck_dir)


# -- the model's per-request threads: slots, outcome, metrics --------------------------------------------------------------
class Busy(RequestError):
    """Every slot is taken and the queue is full."""


class Slots:
    """At most `size` requests generate at once (GpuProfile.max_batch: the canvases the graphs' batch holds);
    up to `max_queued` more wait in arrival order; beyond that a request is refused with Busy. A finished,
    failed or cancelled request frees its slot at once (`release` in a finally)."""

    def __init__(self, size: int, max_queued: int):
        self.size, self.max_queued = size, max_queued
        self.in_use = 0
        self._waiting: list[object] = []
        self._cv = threading.Condition()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def acquire(self, should_stop: Callable[[], bool] | None = None, poll_s: float = 0.05,
                on_queued: Callable[[], None] | None = None) -> None:
        """Take a slot; wait in line when none is free (on_queued() once in line). Raises Busy when the line is
        full and Cancelled when should_stop() turns true while waiting."""
        with self._cv:
            if self.in_use < self.size and not self._waiting:
                self.in_use += 1
                return
            if len(self._waiting) >= self.max_queued:
                raise Busy(f"dgemma is full: {self.in_use} requests generating (max_batch={self.size}, "
                           f"GpuProfile.max_batch) and {len(self._waiting)} queued (max {self.max_queued}); "
                           "retry later.")
            me = object()
            self._waiting.append(me)
            if on_queued is not None:
                on_queued()
            try:
                while not (self.in_use < self.size and self._waiting[0] is me):
                    if should_stop is not None and should_stop():
                        raise Cancelled("cancelled while queued for a slot")
                    self._cv.wait(poll_s)
                self.in_use += 1
            finally:
                self._waiting.remove(me)
                self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self.in_use -= 1
            self._cv.notify_all()


# custom metrics the dgemma model reports on Triton's metrics endpoint: name -> (kind, description, buckets)
METRICS = {
    "dgemma_steps_per_canvas": ("histogram", "Denoising steps per committed canvas",
                                (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48)),
    "dgemma_canvases_per_request": ("histogram", "Canvases committed per request (cancelled requests included)",
                                    (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)),
    "dgemma_requests_total": ("counter", "Requests the dgemma model finished, by outcome (ok, cancelled, error, busy)",
                              None),
    "dgemma_graph_seconds": ("histogram", "Wall time of one backend call seen by the canvas loop (graph=encoder: "
                             "prefill/commit; graph=denoiser: one denoising step; BLS round trip included)",
                             (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)),
    "dgemma_requests_active": ("gauge", "Requests generating now (slots in use)", None),
    "dgemma_requests_queued": ("gauge", "Requests waiting for a slot", None),
}


class Recorder:
    """Updates METRICS through `make(name, labels)` -> an object with observe/increment/set (pb_utils.Metric in
    the model; anything alike in tests). Thread-safe."""

    def __init__(self, make: Callable[[str, dict], Any] | None):
        self._lock = threading.Lock()
        self._m: dict[tuple, Any] = {}
        self._make = make

    def _get(self, name: str, **labels):
        key = (name, tuple(sorted(labels.items())))
        if key not in self._m:
            self._m[key] = self._make(name, labels)
        return self._m[key]

    def canvas(self, steps: int) -> None:
        if self._make:
            with self._lock:
                self._get("dgemma_steps_per_canvas").observe(float(steps))

    def graph_call(self, graph: str, seconds: float) -> None:
        if self._make:
            with self._lock:
                self._get("dgemma_graph_seconds", graph=graph).observe(seconds)

    def finished(self, canvases: int | None, outcome: str, slots: Slots) -> None:
        if self._make:
            with self._lock:
                if canvases is not None:
                    self._get("dgemma_canvases_per_request").observe(float(canvases))
                self._get("dgemma_requests_total", outcome=outcome).increment(1)
                self._occupancy(slots)

    def occupancy(self, slots: Slots) -> None:
        if self._make:
            with self._lock:
                self._occupancy(slots)

    def _occupancy(self, slots: Slots) -> None:
        self._get("dgemma_requests_active").set(float(slots.in_use))
        self._get("dgemma_requests_queued").set(float(slots.queued))


def timed(backend, recorder: Recorder):
    """`backend` reporting the wall time of every encode/denoise call to the Recorder (torch imported here)."""
    from ..runtime.base import BackendWrapper

    class Timed(BackendWrapper):
        def encode(self, state, ids):
            t0 = time.perf_counter()
            self.inner.encode(state, ids)
            recorder.graph_call("encoder", time.perf_counter() - t0)

        def denoise(self, state, canvas, soft, temperature):
            t0 = time.perf_counter()
            out = self.inner.denoise(state, canvas, soft, temperature)
            recorder.graph_call("denoiser", time.perf_counter() - t0)
            return out

    return Timed(backend)


def serve(engine, req: Request, send: Callable[[dict], None], should_stop: Callable[[], bool], slots: Slots,
          recorder: Recorder, log: Callable[[str], None] = lambda s: None) -> str:
    """One request on the model's per-request thread: wait for a slot, generate, free the slot, record.
    -> outcome ("ok", "cancelled"); DgemmaErrors (bad request, Busy) and bugs propagate after recording."""
    backend, sampler, tok = engine
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
        run(timed(backend, recorder), sampler, tok, req, send, should_stop, on_commit)
        outcome = "ok"
    except Cancelled as e:
        outcome = "cancelled"
        log(f"dgemma: {e} after {committed} committed canvas(es), {time.perf_counter() - t0:.3f} s; "
            "slot freed")
    finally:
        slots.release()
        recorder.finished(committed, outcome, slots)
    return outcome
