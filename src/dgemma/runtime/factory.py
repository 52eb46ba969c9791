"""THE backend factory: a backend kind, a precision and a GPU profile -> a ready `Engine` (backend, model and
sampler configs, tokenizer). The CLI, the benchmarks, the Triton model and the tests all build backends here, so
the rules live once:

  torch  the native model eagerly (CPU reference; on CUDA only the checkpoint's own dtype); `batched=True` runs
         its static passes with per-row lengths instead (TorchGraphBackend), what the serving scheduler needs
  fast   the native model with static shapes, CUDA graphs and the fused Triton kernels (dgemma.runtime.fast): fp8
         converts the checkpoint's weights; nvfp4 serves `make quantize PRECISION=nvfp4`'s output (quantize/nvfp4/
         in the work directory, or a --checkpoint holding it): NVFP4 experts (W4A16), FP8 dense projections;
         `batched=True`: the same quantised model under the static passes (TorchGraphBackend: on CUDA, batch
         buckets of rows, each replayed as a CUDA graph)
  ort    the exported graphs in ONNX Runtime: build/onnx/<p>/ with p = fp32 for bf16 (ONNX Runtime's CPU provider
         has no bf16 kernels), fp8 as is; nvfp4 graphs run only in TensorRT
  trt    the TensorRT engines in engines/<gpu>/<precision>/ (GPU: this machine's profile by default)
  bls    inside the Triton `dgemma` model only: BLS requests to its `encoder`/`denoiser` models
Missing artifacts raise ArtifactError naming the directory and the make command that builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.config import ModelConfig, SamplerConfig
from ..core.errors import ArtifactError, ConfigError
from ..core.layout import Layout
from ..core.profiles import for_device, resolve
from ..model.checkpoint import SYNTHETIC, checkpoint_dir, load_config, load_config_of, load_model
from ..model.tokens import Tokenizer
from .bls_backend import BlsBackend
from .fast import FastBackend, describe_footprint, load_nvfp4, quantize_fp8_, quantize_nvfp4_
from .ort_backend import OrtBackend
from .torch_backend import TorchBackend, TorchGraphBackend
from .trt_backend import TrtBackend

KINDS = ("torch", "fast", "ort", "trt", "bls")
ORT_PRECISIONS = {"fp32": "fp32", "bf16": "fp32", "fp8": "fp8"}  # requested precision -> graphs ORT runs


@dataclass
class Engine:
    """What a generating process needs: the backend and the checkpoint's configs and tokenizer."""

    backend: Any  # dgemma.runtime.base.Backend
    config: ModelConfig
    sampler: SamplerConfig
    tokenizer: Any = None  # dgemma.model.tokens.Tokenizer, None for a checkpoint without tokenizer.json
    checkpoint: Path | None = None  # None: synthetic weights
    kind: str = "torch"
    info: dict = field(default_factory=dict)  # what a result should record (graph dir, precision, ...)


def default_gpu() -> str:
    """This machine's GPU profile (by device name), or `cpu` without a visible GPU."""
    return for_device(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"


def ort_precision(precision: str) -> str:
    if precision == "nvfp4":
        raise ConfigError("ONNX Runtime cannot run nvfp4 graphs (FLOAT4E2M1 weights, trt::TRT_FP4DynamicQuantize); "
                          "they run only in TensorRT-RTX on SM120+ (`make engines PRECISION=nvfp4`). Use --precision "
                          "fp8 or bf16 (fp32 graphs) with --backend ort.")
    if precision not in ORT_PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} for --backend ort; valid: {', '.join(ORT_PRECISIONS)}.")
    return ORT_PRECISIONS[precision]


def create(kind: str, precision: str = "bf16", gpu: str | None = None, checkpoint: str | Path | None = None, *,
           device: str | None = None, max_context: int | None = None, threads: int | None = None,
           layout: Layout | None = None, onnx_dir: str | Path | None = None, model=None, dtype: str | None = None,
           pb_utils=None, kernels: str = "auto", batched: bool = False) -> Engine:
    """Build one backend. checkpoint: a directory, None (the embedded tiny model) or `synthetic`; model: an already
    loaded DiffusionGemma for torch/fast (skips loading). max_context: KV capacity (None: the backend's default).
    kernels: the fast backend's fused kernels ("auto" | "off" | "force", runtime.fast.policy).
    batched: a backend whose calls take a subset of its rows at different lengths (GraphBackend: ort, trt, bls
    always are; torch and fast then run the static passes), for in-flight batching."""
    if kind not in KINDS:
        raise ConfigError(f"unknown backend {kind!r}; valid: {', '.join(KINDS)}.")
    layout = layout or Layout.of()
    if kind == "fast" and precision == "nvfp4" and model is None:
        return _fast_nvfp4(checkpoint, gpu, device, max_context, layout, kernels, batched)
    ck_dir = checkpoint_dir(checkpoint)
    if kind in ("torch", "fast"):
        device = device or ("cuda" if torch.cuda.is_available() and gpu not in (None, "cpu") else "cpu")
        if model is None:
            ck = load_model(checkpoint, device, dtype)
            model, cfg, sampler, tok = ck.model, ck.config, ck.sampler, ck.tokenizer
        else:  # the caller loaded it: configs and tokenizer from `checkpoint` when it names a directory
            given = checkpoint is not None and ck_dir is not None
            cfg, sampler = model.cfg, load_config_of(checkpoint)[1] if given else SamplerConfig()
            tok = Tokenizer(ck_dir) if given and (ck_dir / "tokenizer.json").exists() else None
            ck_dir = ck_dir if given else None
        if kind == "torch":
            if precision not in ("bf16", "fp32") and model.device.type == "cuda":
                raise ConfigError(f"backend 'torch' runs the checkpoint's own dtype; precision {precision!r} needs "
                                  "--backend fast (FP8 weights) or an engine backend.")
            backend = (TorchGraphBackend if batched else TorchBackend)(model, max_context=max_context)
        else:
            if precision == "fp8":
                quantize_fp8_(model)
            elif precision == "nvfp4":
                quantize_nvfp4_(model)  # a model handed in (or synthetic weights): quantised here
            # FastBackend's states hold one length per batch: batched serving runs the quantised model's static
            # passes instead (TorchGraphBackend: per-row lengths, a CUDA graph per batch bucket)
            backend = (TorchGraphBackend(model, max_context=max_context) if batched
                       else FastBackend(model, max_context=max_context, kernels=kernels))
        info = {"device": str(model.device)}
        if kind == "fast" and not batched:
            info |= {"kernels": backend.kernels.summary(), "weights": backend.footprint}
        return Engine(backend, cfg, sampler, tok, ck_dir, kind, info)

    cfg, sampler = load_config_of(checkpoint)
    tok = Tokenizer(ck_dir) if ck_dir is not None and (ck_dir / "tokenizer.json").exists() else None
    if kind == "ort":
        d = Path(onnx_dir) if onnx_dir else layout.onnx(ort_precision(precision))
        if not (d / "manifest.json").exists():
            raise ArtifactError(f"{d}/manifest.json not found: --backend ort needs the exported ONNX graphs there. "
                                f"Export them with: make onnx PRECISION={d.name}"
                                + ("" if onnx_dir else " (or pass --onnx-dir DIR)"))
        backend = OrtBackend(d, checkpoint=ck_dir, cfg=cfg, max_context=max_context, threads=threads)
        return Engine(backend, cfg, sampler, tok, ck_dir, kind, {"onnx_dir": str(d), "onnx_precision": backend.precision})
    if kind == "trt":
        target = resolve(gpu or default_gpu(), precision, kind)
        d = layout.engines(target.gpu.name, target.precision.value)
        if not (d / "manifest.json").exists():
            raise ArtifactError(f"{d}/manifest.json not found: --backend trt needs TensorRT engines there. Build "
                                f"them with: make engines GPU={target.gpu.name} PRECISION={target.precision.value}")
        backend = TrtBackend(d, max_context=max_context)
        return Engine(backend, cfg, sampler, tok, ck_dir, kind, {"engine_dir": str(d)})
    # kind == "bls": inside the Triton dgemma model
    dev = device or ("cuda" if torch.cuda.is_available() and gpu not in (None, "cpu") else "cpu")
    backend = BlsBackend(cfg, precision, max_context=max_context or cfg.max_position_embeddings, device=dev,
                         pb_utils=pb_utils, target=f"{gpu}/{precision}")
    return Engine(backend, cfg, sampler, tok, ck_dir, kind, {"graph_precision": precision})


def _fast_nvfp4(checkpoint, gpu, device, max_context, layout: Layout, kernels: str, batched: bool) -> Engine:
    """--backend fast --precision nvfp4: the quantize output (default quantize/nvfp4/ in the work directory), or
    `synthetic` full-size weights quantised on the device."""
    device = device or ("cuda" if torch.cuda.is_available() and gpu not in (None, "cpu") else "cpu")
    if checkpoint == SYNTHETIC:
        ck = load_model(SYNTHETIC, device, "bfloat16")
        model, cfg, sampler, tok, qdir = quantize_nvfp4_(ck.model), ck.config, ck.sampler, None, None
    else:
        qdir = Path(checkpoint) if checkpoint is not None else layout.quantize("nvfp4")
        if not (qdir / "hf_quant_config.json").exists():
            what = "no NVFP4 checkpoint (hf_quant_config.json)" if qdir.is_dir() else "does not exist"
            raise ArtifactError(f"{qdir} {what}: --backend fast --precision nvfp4 serves the output of `dgemma "
                                f"quantize --precision nvfp4`. Write it with: make quantize PRECISION=nvfp4"
                                + ("" if checkpoint is None else " (CKPT=<checkpoint dir>), then pass that "
                                   "quantize directory"))
        model = load_nvfp4(qdir, device)
        cfg, sampler = load_config(qdir)
        tok = Tokenizer(qdir) if (qdir / "tokenizer.json").exists() else None
    if batched:
        backend = TorchGraphBackend(model, max_context=max_context)
        return Engine(backend, cfg, sampler, tok, qdir, "fast", {"device": str(model.device), "batched": True})
    backend = FastBackend(model, max_context=max_context, kernels=kernels)
    info = {"device": str(model.device), "quantize_dir": str(qdir) if qdir else SYNTHETIC,
            "kernels": backend.kernels.summary(), "weights": backend.footprint,
            "weights_summary": describe_footprint(backend.footprint)}
    return Engine(backend, cfg, sampler, tok, qdir, "fast", info)
