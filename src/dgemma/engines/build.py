"""TensorRT engines from the exported ONNX graphs: engines/<gpu>/<precision>/{encoder,denoiser}.plan + manifest.json.

Owns the one builder over the TensorRT Python API (`tensorrt` if importable, else `tensorrt_rtx`): strongly typed
network, one optimisation profile per graph from dgemma.graphs + the GpuProfile, explicit compute capabilities
(GPU=cpu: TensorRT-RTX ahead-of-time on the CPU for SM120 and SM89; NVFP4 graphs SM120 only), and the manifest
that ties an engine to its ONNX manifest. Refuses stale or mismatched inputs with the make command that rebuilds.
Knows nothing of sampling.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from ..core import contract
from ..core.config import ModelConfig
from ..core.errors import ConfigError, ArtifactError
from ..core.layout import current
from ..core.manifest import (check_quantize_source, file_sha256, publish_dir, read_onnx_manifest,
                             verify_onnx_files)
from ..core.profiles import GpuProfile, check_memory, resolve
from ..runtime.trt_backend import import_tensorrt
CPU_AOT_SM = (120, 89)  # GPU=cpu: build for RTX Blackwell (and Ada) ahead of time, no GPU needed
CPU_AOT_SM_BY_PRECISION = {"nvfp4": (120,)}  # ... except NVFP4 graphs: Ada (SM89) has FP8 but no FP4
RTX_SM = (75, 80, 86, 89, 120, 121)  # what TensorRT-RTX 1.7 can target (no Hopper sm_90, no sm_100)


def import_trt(gpu: GpuProfile):
    """-> (module, flavour): runtime.trt_backend.import_tensorrt, refusing a GPU that TensorRT-RTX cannot target."""
    trt, flavour = import_tensorrt("engine builds")
    if flavour == "tensorrt_rtx" and gpu.sm and gpu.sm not in RTX_SM:
        raise ConfigError(f"GPU profile {gpu.name!r} is compute capability {gpu.sm / 10:.1f}; TensorRT-RTX only "
                          f"targets {', '.join(f'{s / 10:.1f}' for s in RTX_SM)}. Build {gpu.name} engines with full "
                          "TensorRT (NGC container nvcr.io/nvidia/tensorrt) where `import tensorrt` works.")
    return trt, flavour


def check_sm(precision: str, sm: int, flavour: str) -> None:
    """The hardware rule of the graph's low-precision datatype (TensorRT-RTX support matrix 1.5: FP8 on 8.9 and
    12.x, FP4 GEMM on 12.x only; the builder itself fails with "HW-specific datatypes: fp4_e2m1" for SM89)."""
    if flavour == "tensorrt_rtx" and sm not in RTX_SM:
        raise ConfigError(f"SM{sm} is not a TensorRT-RTX target; valid: {', '.join(map(str, RTX_SM))}.")
    if precision == "fp8" and sm < 89:
        raise ConfigError(f"cannot build fp8 engines for SM{sm}: FP8 (e4m3) needs compute capability >= 8.9 "
                          "(Ada, Hopper, Blackwell). Build for --sm 120,89.")
    if precision == "nvfp4" and (sm < 100 or (flavour == "tensorrt_rtx" and sm not in (120, 121))):
        raise ConfigError(f"cannot build nvfp4 engines for SM{sm}: NVFP4 (e2m1) needs FP4 tensor cores, i.e. "
                          "compute capability 10.0 with full TensorRT or 12.x (SM120/SM121) with TensorRT-RTX; SM89 "
                          "(Ada) has FP8 but no FP4. Build for --sm 120, or use --precision fp8 for SM89.")


def target_sms(gpu: GpuProfile, flavour: str, precision: str = "bf16",
               sms: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Compute capabilities to build for: the GPU profile's, or for GPU=cpu the graph precision's ahead-of-time
    set; `sms` forces a set. Every one is checked against the precision's hardware rule."""
    if gpu.sm == 0 and flavour != "tensorrt_rtx":
        raise ConfigError("GPU=cpu builds ahead of time with TensorRT-RTX, but full `tensorrt` was imported; "
                          "use --gpu <profile> on the GPU machine instead.")
    if sms is not None and flavour != "tensorrt_rtx":
        raise ConfigError("--sm sets TensorRT-RTX compute capabilities; full TensorRT builds for the GPU it runs on "
                          "(drop --sm).")
    if sms is None:
        sms = CPU_AOT_SM_BY_PRECISION.get(precision, CPU_AOT_SM) if gpu.sm == 0 else (gpu.sm,)
    for sm in sms:
        check_sm(precision, sm, flavour)
    return tuple(sms)


def _parse(trt, logger, path: Path, flavour: str):
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errs = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise ArtifactError(f"{path}: the TensorRT ({flavour}) ONNX parser rejects it: {'; '.join(errs[:3])}. "
                            "Re-export with `make onnx`.")
    return builder, network, parser


def build_graph(trt, flavour: str, onnx_path: Path, graph: str, cfg: ModelConfig, gpu: GpuProfile,
                precision: str, sms: tuple[int, ...], workspace_gib: float | None = None,
                timing_cache: Path | None = None) -> bytes:
    """One serialized engine for one graph (one optimisation profile covering the GpuProfile's shapes).

    timing_cache (full TensorRT only; TensorRT-RTX compiles kernels just in time on the device and keeps a runtime
    cache instead, see TrtBackend): read before the build when present, written back after it.
    """
    logger = trt.Logger(trt.Logger.ERROR)
    builder, network, _parser = _parse(trt, logger, onnx_path, flavour)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in contract.profile_shapes(graph, cfg, gpu, precision).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if flavour == "tensorrt_rtx":
        config.num_compute_capabilities = len(sms)
        for k, sm in enumerate(sms):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm}"), k)
    cache = None
    if timing_cache is not None and flavour == "tensorrt":
        old = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(old) or config.create_timing_cache(b"")  # unreadable cache: start anew
        if not config.set_timing_cache(cache, ignore_mismatch=False):  # recorded on another GPU: start anew
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if cache is not None and plan is not None:
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(timing_cache)
    if plan is None or plan.nbytes == 0:
        raise ArtifactError(f"TensorRT ({flavour}) failed to build the {graph} engine from {onnx_path} for "
                            f"SM {', '.join(map(str, sms))} (see the log above).")
    return bytes(plan)


def build_engines(gpu: str, precision: str, onnx_root: str | Path | None = None, out_root: str | Path | None = None,
                  onnx_precision: str | None = None, sms: tuple[int, ...] | None = None) -> Path:
    """engines/<gpu>/<precision>/{encoder,denoiser}.plan + manifest.json, written atomically.

    onnx_precision: which build/onnx/<p>/ to read (default: `precision`; fp32 graphs serve tests on CPU).
    sms: force the compute capabilities (default: the GPU profile's; GPU=cpu: the graph precision's AOT set).
    """
    target = resolve(gpu, precision)
    prof = target.gpu
    onnx_precision = onnx_precision or precision
    onnx_dir = (Path(onnx_root) if onnx_root else current().onnx()) / onnx_precision
    m = read_onnx_manifest(onnx_dir)
    fix = f"Rebuild with `make onnx PRECISION={onnx_precision}`."
    if m.get("precision") != onnx_precision:
        raise ArtifactError(f"{onnx_dir}/manifest.json says precision {m.get('precision')!r}, expected "
                            f"{onnx_precision!r}. {fix}")
    verify_onnx_files(onnx_dir, m)
    check_quantize_source(onnx_dir, m)  # fp8/nvfp4: refuse graphs whose quantize/<p>/ was rewritten since export
    cfg = ModelConfig.from_hf_dict(m["model_config"], source=str(onnx_dir / "manifest.json"))
    if m.get("contract_sha256") != contract.contract_hash(cfg, onnx_precision):
        raise ArtifactError(f"{onnx_dir}: IO contract {m.get('contract_sha256')} in the manifest, this dgemma "
                            f"expects {contract.contract_hash(cfg, onnx_precision)} (contract.py changed). {fix}")
    # before anything is built: both engines + KV buffers must fit the GPU (raises with the numbers and what fits)
    check_memory(target, cfg, engines=len(contract.GRAPHS))
    trt, flavour = import_trt(prof)
    sms = target_sms(prof, flavour, onnx_precision, sms)
    out_root = Path(out_root) if out_root else current().engines()
    final = out_root / prof.name / precision
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{precision}-", dir=final.parent))
    try:
        info = {}
        for g in contract.GRAPHS:
            t0 = time.perf_counter()
            plan = build_graph(trt, flavour, onnx_dir / g / "model.onnx", g, cfg, prof, onnx_precision, sms,
                               timing_cache=final.parent / f"{g}.timing.cache")
            (tmp / f"{g}.plan").write_bytes(plan)
            info[g] = {"bytes": len(plan), "seconds": round(time.perf_counter() - t0, 3),
                       "sha256": hashlib.sha256(plan).hexdigest(),
                       "profile": {k: [list(s) for s in v]
                                   for k, v in contract.profile_shapes(g, cfg, prof, onnx_precision).items()}}
        manifest = {
            "schema": 1, "stage": "engines", "gpu_profile": prof.__dict__ | {"precisions": [p.value for p in
                                                                                           prof.precisions]},
            "precision": precision, "onnx_precision": onnx_precision, "compute_capabilities": list(sms),
            "tensorrt": {"flavour": flavour, "version": trt.__version__},
            "onnx_dir": str(onnx_dir.resolve()), "onnx_manifest_sha256": file_sha256(onnx_dir / "manifest.json"),
            "onnx_dtype": m.get("dtype"), "quantization": m.get("quantization"),
            "contract_sha256": m.get("contract_sha256"), "model_config": m["model_config"], "engines": info,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
