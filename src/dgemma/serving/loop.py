"""One request of the Triton `dgemma` model as the scheduler runs it, independent of Triton: `Job` turns a validated
Request into a Generation (its own RNG, sampler settings, infill template, logprobs) and its callbacks into the
model's responses (dicts of numpy arrays, `Job.send`): one per committed canvas when streaming (plus per-step
drafts on request), exactly one otherwise, then a last one with the statistics and the finish reason. Stop
sequences cut the text and end generation with the canvas that holds them. Also: the rendered config's
parameters (`model_parameters`) and the model instance's engine, built once through the one factory
(`load_engine`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..core.errors import ArtifactError
from ..core.layout import PACKAGE
from ..generation.infill import infill_template
from ..generation.sampler import Generation, Rng, check_request, stats_for
from ..runtime.factory import create
from .request import Limits, Request

# how the canvas loop computes: in-process ONNX Runtime / torch, or BLS requests to the encoder/denoiser models
BACKENDS = ("ort", "torch", "bls")


def _batch(a: np.ndarray) -> np.ndarray:
    return a[None]  # the model has max_batch_size 1: every output carries a leading batch dim of 1


class Job:
    """A request's generation and its responses. `send(tensors)` hands a response (output name -> array) to
    Triton; the scheduler calls `on_step` / `on_canvas` from its thread and `finish` once the row leaves."""

    def __init__(self, req: Request, engine, send: Callable[[dict], None], arrived: float | None = None,
                 ids: bool = False):
        """ids: the ensemble's canvas_loop step: token ids (`output_ids`) instead of text, and every output of
        CANVAS_LOOP_OUTPUTS in every response (an ensemble passes on what each step produced)."""
        self.req, self.engine, self._send, self.ids = req, engine, send, ids
        self.tok = engine.tokenizer
        backend = engine.backend
        cfg = engine.sampler.replace(max_new_tokens=req.max_tokens, max_denoising_steps=req.max_denoising_steps,
                                     entropy_bound=req.entropy_bound, ignore_eos=req.ignore_eos, t_min=req.t_min,
                                     t_max=req.t_max, adaptive_stopping=req.adaptive_stopping)
        self.cfg = cfg
        self.prompt = torch.tensor([req.input_ids], dtype=torch.int64, device=backend.device)
        n_canvases = check_request(self.prompt, cfg, backend)
        template = None
        if req.infill is not None:
            template = infill_template(self.tok, req.infill, backend.canvas_length, cfg.max_new_tokens)
            template = template.to(backend.device)
        generator = torch.Generator(device=backend.device).manual_seed(req.seed)
        self.gen = Generation(self.prompt, cfg, Rng([generator]), backend.canvas_length, backend.vocab_size,
                              template, n_canvases, req.logprobs, stats_for(backend.device))
        self.special = set(cfg.eos_token_ids) | {cfg.pad_token_id}
        self.text = ""  # text sent so far (streaming) / kept (stop sequences are searched in it)
        self.tokens: list[int] = []  # the tokens of that text
        self.lp: list[np.ndarray] = []  # their logprobs (chosen, top ids, top logprobs) per canvas
        self.finish_reason = "length"
        self.stopped = False
        self.arrived = arrived if arrived is not None else time.perf_counter()
        self.first_canvas_s: float | None = None
        self.outcome = "error"

    # -- scheduler callbacks ---------------------------------------------------------------------------------------
    def on_step(self, ev) -> None:
        if self.req.stream and self.req.stream_drafts:
            steps = self.gen.steps_per_canvas[: ev.canvas] + [ev.step]  # the canvases so far, this one's step
            draft = ev.draft[0].tolist()
            self.send(self._tensors(self.tok.decode(draft), ev.canvas, ev.canvas, steps, draft=True, toks=draft))

    def on_canvas(self, i: int, committed: torch.Tensor) -> None:
        if self.first_canvas_s is None:
            self.first_canvas_s = time.perf_counter() - self.arrived
        ids = [int(t) for t in committed[0].tolist()]
        keep = [j for j, t in enumerate(ids) if t not in self.special]
        toks = [ids[j] for j in keep]
        text = self.tok.decode(toks)
        cut = self._stop_cut(self.text + text)
        if cut is not None:  # a stop sequence: keep the text before it, end with this canvas
            n = max(0, cut - len(self.text))
            text, keep, toks = text[:n], *self._tokens_within(keep, toks, n)
            self.gen.stop()
            self.stopped = True
            self.finish_reason = "stop"
        lp = self._logprobs(keep)
        self.text += text
        self.tokens += toks
        if lp is not None:
            self.lp.append(lp)
        if self.req.stream:
            self.send(self._tensors(text, i, i + 1, self.gen.steps_per_canvas, toks=toks, lp=lp))

    def finish(self) -> None:
        """The row left the scheduler having finished: the last response (stream: the statistics; otherwise the
        whole answer)."""
        res = self.gen.result()
        if not self.stopped and res.finished is not None and bool(res.finished[0]):
            self.finish_reason = "stop"  # an EOS
        tpf = float(res.tokens_per_forward[0])
        if self.req.stream:
            self.send(self._tensors("", res.canvases, res.canvases, res.steps_per_canvas, tpf, final=True, toks=[]))
        else:
            lp = tuple(np.concatenate(parts) for parts in zip(*self.lp)) if self.lp else None
            # one decode of all tokens (a character may span two canvases); a stop cut is already text
            text = self.text if self.stopped else self.tok.decode(self.tokens)
            self.send(self._tensors(text, 0, res.canvases, res.steps_per_canvas, tpf, final=True, toks=self.tokens,
                                    lp=lp))
        self.outcome = "ok"

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _stop_cut(self, text: str) -> int | None:
        found = [text.find(w) for w in self.req.stop_words]
        found = [i for i in found if i >= 0]
        return min(found) if found else None

    def _tokens_within(self, keep: list[int], toks: list[int], n_chars: int) -> tuple[list[int], list[int]]:
        """The leading tokens whose decoded text fits in the first n_chars characters."""
        k = 0
        while k < len(toks) and len(self.tok.decode(toks[: k + 1])) <= n_chars:
            k += 1
        return keep[:k], toks[:k]

    def _logprobs(self, keep: list[int]):
        if self.req.logprobs is None:
            return None
        chosen, top_ids, top_lp = self.gen.lp_chunks[-1]
        chosen = chosen[0, keep].float().cpu().numpy()
        if top_ids is None:
            k = 0
            return chosen, np.zeros((len(keep), k), np.int64), np.zeros((len(keep), k), np.float32)
        return chosen, top_ids[0, keep].cpu().numpy(), top_lp[0, keep].float().cpu().numpy()

    def _tensors(self, text: str, canvas_index: int, canvases: int, steps: list[int], tpf: float = 0.0,
                 draft: bool = False, final: bool = False, toks: list[int] | None = None, lp=None) -> dict:
        out = {
            "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
            "is_draft": np.array([draft], dtype=np.bool_),
            "canvas_index": np.array([canvas_index], dtype=np.int32),
            "canvases": np.array([canvases], dtype=np.int32),
            "steps_per_canvas": np.asarray(list(steps) or [0], dtype=np.int32),
            "tokens_per_forward": np.array([tpf], dtype=np.float32),
        }
        if final:
            out["finish_reason"] = np.array([self.finish_reason.encode()], dtype=np.object_)
        if not draft:
            if self.req.return_num_input_tokens:
                out["num_input_tokens"] = np.array([len(self.req.input_ids)], dtype=np.uint32)
            if self.req.return_num_output_tokens:
                out["num_output_tokens"] = np.array([len(toks or [])], dtype=np.uint32)
            if self.req.logprobs is not None and toks is not None:
                k = self.req.logprobs
                chosen, tids, tlp = lp if lp is not None else (np.zeros(0, np.float32), np.zeros((0, k), np.int64),
                                                               np.zeros((0, k), np.float32))
                out["output_token_ids"] = np.asarray(toks, dtype=np.int64)
                out["output_logprobs"] = np.asarray(chosen, dtype=np.float32)
                if k:
                    out["output_top_logprob_ids"] = np.asarray(tids, dtype=np.int64).reshape(-1, k)
                    out["output_top_logprobs"] = np.asarray(tlp, dtype=np.float32).reshape(-1, k)
        if self.ids:
            out = self._every_output(out, toks or [], 0 if draft else len(toks or []))
        return {name: _batch(a) for name, a in out.items()}

    def _every_output(self, out: dict, toks: list[int], n_out: int) -> dict:
        """The canvas_loop step's response: output_ids for text_output (postprocess decodes them: after a stop
        sequence, the kept tokens' text), the optional outputs always present."""
        del out["text_output"]
        n = np.array([n_out], dtype=np.uint32)
        return {"output_ids": np.asarray(toks, dtype=np.int64), **out,
                "finish_reason": out.get("finish_reason", np.array([b""], dtype=np.object_)),
                "num_input_tokens": np.array([len(self.req.input_ids)], dtype=np.uint32),
                "num_output_tokens": out.get("num_output_tokens", n),
                "output_token_ids": out.get("output_token_ids", np.zeros(0, np.int64)),
                "output_logprobs": out.get("output_logprobs", np.zeros(0, np.float32)),
                "output_top_logprob_ids": out.get("output_top_logprob_ids", np.zeros((0, 0), np.int64)),
                "output_top_logprobs": out.get("output_top_logprobs", np.zeros((0, 0), np.float32))}

    def send(self, tensors: dict) -> None:
        self._send(tensors)


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
    initialize() from the rendered parameters: `backend` ort | torch in-process, or bls to the graph models. The
    backend takes rows at different positions in one call (batched=True), for the in-flight scheduler."""
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
                  onnx_dir=params.get("onnx_dir") or None, pb_utils=pb_utils, batched=True)
