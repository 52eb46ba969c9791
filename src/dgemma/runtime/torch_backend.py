"""Backends over the native torch model: `TorchBackend` (the native passes with a shared-length KVCache: the CPU
reference and plain CUDA eager path) and `TorchGraphBackend` (the static passes with per-row lengths, for
batching requests at different positions, padded to batch buckets and replayed as CUDA graphs on a GPU)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..core import contract
from ..core.errors import ConfigError
from ..model.modeling import DiffusionGemma, KVCache
from ..model.static_passes import DenoiserGraph, EncoderGraph
from .graph_backend import DTYPES, GraphBackend, GraphState

log = logging.getLogger("dgemma")


class TorchBackend:
    def __init__(self, model: DiffusionGemma, max_context: int | None = None):
        self.model = model
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.canvas_length = cfg.canvas_length
        self.device = model.device
        self.max_context = max_context or min(cfg.max_position_embeddings, 8192)

    def new_state(self, batch: int) -> KVCache:
        return self.model.new_cache(batch, self.max_context)

    def length(self, state: KVCache) -> int:
        return state.length

    @torch.no_grad()
    def encode(self, state: KVCache, ids: Tensor) -> None:
        self.model.encode(ids, state)

    @torch.no_grad()
    def ar_step(self, state: KVCache, ids: Tensor) -> Tensor:
        """Autoregressive baseline: causal pass over ids [B,S] returning next-token logits [B,V]."""
        return self.model.encode(ids, state, last_logits=True)

    @torch.no_grad()
    def denoise(self, state: KVCache, canvas: Tensor, soft: Tensor | None, temperature: Tensor):
        raw = self.model.denoise(canvas, soft, state)
        return raw, self.model.soft_embed(raw / temperature)


class TorchGraphBackend(GraphBackend):
    """The two static passes (dgemma.model.static_passes) run by torch over fixed-capacity KV buffers: per-row
    positions, so rows of a batch may sit at different lengths (what the in-flight batching scheduler needs) —
    the same arithmetic the exported graphs hold. Precision = the model's dtype (fp32 or bf16 graphs; an FP8
    model keeps its FP8 linear modules inside the passes).

    On the CPU a row's numbers do not depend on the other rows of its call (the scheduler's promise that a
    request's answer is the one it gets alone): the experts run as the exported graphs run them (every expert
    on every token, one GEMM of all the call's tokens per expert, instead of per-expert groups of a few tokens),
    and encoder calls of fewer than MIN_TOKENS tokens per row are padded at the end (causal: the real tokens
    never see the pads; their K/V are dropped), because CPU GEMMs over fewer than 4 rows take a path that
    rounds differently (measured: MKL, fp32, up to 2e-5 apart). On CUDA the grouped experts stay.

    Batch buckets (default on CUDA): a denoising step or a commit (an encoder call of one canvas) over rows R of a
    state of `batch` rows runs over rows [0, b) instead, b the smallest of `bucket_sizes(batch)` (powers of two
    below batch, and batch) that holds every row of R; the other rows of [0, b) are padding (past length 0, their
    outputs dropped; the passes only read the K/V). The scheduler gives the lowest free slot, so the rows in flight
    stay packed at the front. Shapes then depend on (graph, b) only, and on CUDA each is captured once as a CUDA
    graph over the state's own K/V buffers and replayed (cuda_graphs=False: eager). Prompt chunks run eagerly."""

    MIN_TOKENS = 4

    def __init__(self, model: DiffusionGemma, max_context: int | None = None, buckets: bool | None = None,
                 cuda_graphs: bool = True):
        self.cfg, self.device = model.cfg, model.device
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model.dtype)
        if self.precision is None:
            raise ConfigError(f"TorchGraphBackend runs float32 or bfloat16 models (got {model.dtype}).")
        self.max_context = max_context or min(self.cfg.max_position_embeddings, 8192)
        self._setup()
        if self.device.type == "cpu":
            model.set_experts_impl("dense")
        self._passes = {contract.ENCODER: EncoderGraph(model).eval(), contract.DENOISER: DenoiserGraph(model).eval()}
        self.buckets = self.device.type == "cuda" if buckets is None else buckets
        self.use_graphs = bool(cuda_graphs and self.buckets and self.device.type == "cuda")
        self._graphs: dict[tuple, tuple] = {}  # (graph, bucket, K/V address) -> (CUDAGraph, static inputs, outputs)
        self._pool = None

    @staticmethod
    def bucket_sizes(batch: int) -> list[int]:
        """Row counts a call is padded to in a state of `batch` rows: the powers of two below batch, and batch."""
        sizes = [1 << i for i in range(max(batch - 1, 0).bit_length()) if 1 << i < batch]
        return sizes + [batch]

    def _bucket(self, state: GraphState, rows: list[int], graph: str, n: int) -> int | None:
        if not self.buckets or (graph == contract.ENCODER and n != self.canvas_length):
            return None
        top = max(rows) + 1
        return next(b for b in self.bucket_sizes(state.batch) if b >= top)

    def _call(self, graph: str, state: GraphState, rows: list[int] | None, feed: dict[str, Tensor]) -> list[Tensor]:
        rows = list(range(state.batch)) if rows is None else list(rows)
        n = next(iter(feed.values())).shape[1]
        b = self._bucket(state, rows, graph, n)
        if b is None:
            return super()._call(graph, state, rows, feed)
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        lengths = [0] * b
        for r, length in zip(rows, self._lengths(state, rows)):
            lengths[r] = length
        padded = {k: (v.new_ones if k == "temperature" else v.new_zeros)((b, *v.shape[1:])).index_copy_(0, idx, v)
                  for k, v in feed.items()}
        full = {**padded, **self._common(lengths, [a[:b] for a in state.kv], n)}
        out = self._replay(graph, b, full) if self.use_graphs else self._run(graph, full)
        return [o.index_select(0, idx) for o in out]

    def _replay(self, graph: str, b: int, feed: dict[str, Tensor]) -> list[Tensor]:
        """The call as a CUDA graph: captured on first use per (graph, bucket, state), then its static inputs are
        overwritten and it is replayed. A failed capture is logged and every call after it runs eagerly."""
        specs = contract.inputs(graph, self.cfg, self.precision)
        kv = {t.name for t in contract.past(self.cfg, self.precision)}
        args = [feed[t.name].to(self.device, DTYPES[t.dtype]) for t in specs]
        key = (graph, b, next(a.data_ptr() for t, a in zip(specs, args) if t.name in kv))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(graph, [a if t.name in kv else a.clone() for t, a in zip(specs, args)])
            if entry is None:
                return self._run(graph, feed)
            self._graphs[key] = entry
        g, static, out = entry
        for t, s, a in zip(specs, static, args):
            if t.name not in kv:
                s.copy_(a)
        g.replay()
        return out

    def _capture(self, graph: str, static: list[Tensor]) -> tuple | None:
        run = self._passes[graph]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                run(*static)  # warm-up off the capture: lazy initialisation, library workspaces, autotuning
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                out = list(run(*static))
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured: the eager passes still work
            log.warning("CUDA graph capture of the %s pass failed (%s: %s); running eagerly", graph,
                        type(e).__name__, e)
            self.use_graphs = False
            return None
        return g, static, out

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        s = feed["input_ids"].shape[1] if graph == contract.ENCODER else 0
        pad = self.MIN_TOKENS - s if self.device.type == "cpu" and 0 < s < self.MIN_TOKENS else 0
        if pad:
            ids, pos = feed["input_ids"], feed["position_ids"]
            more = pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)
            feed = {**feed, "input_ids": torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1),
                    "position_ids": torch.cat([pos, more], 1)}
        args = [feed[t.name].to(self.device, DTYPES[t.dtype]) for t in contract.inputs(graph, self.cfg, self.precision)]
        out = list(self._passes[graph](*args))
        return [o[:, :, :s] for o in out] if pad else out
