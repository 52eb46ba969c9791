"""Export of the native model's two passes to ONNX: `encoder` and `denoiser` graphs + manifest.json.

Owns the torch.onnx.export call over the static passes (dgemma.model.static_passes: fixed-capacity K/V buffers +
past_length in, new K/V out; masks built inside; dynamo first, legacy TorchScript exporter as fallback), external
data for models over 2 GB, onnx.checker, and the atomic output layout build/onnx/<precision>/{encoder,denoiser}/
model.onnx + manifest.json in the work directory. Names and dims come from dgemma.core.contract. Knows nothing of
sampling, ONNX Runtime or TensorRT.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..core import contract
from ..core.errors import ArtifactError, ConfigError
from ..core.layout import current
from ..core.manifest import MANIFEST, checkpoint_fingerprint, file_sha256, publish_dir
from ..model.modeling import DiffusionGemma
from ..model.static_passes import DenoiserGraph, EncoderGraph
from ..runtime.graph_backend import DTYPES

TWO_GB = 2**31 - 1
OPSET = 18


# -- example inputs ---------------------------------------------------------------------------------------------
# distinct example sizes so no two symbolic dims are unified (and none is 0/1, which exporters specialise)
_EXAMPLE = {contract.BATCH: 2, contract.SEQ: 3, contract.KV_CAPACITY: 11}
_EXAMPLE_LENGTHS = (7, 5)  # past_length per example row (<= kv_capacity)


def example_inputs(graph: str, cfg, precision: str) -> tuple[Tensor, ...]:
    out = []
    lengths = torch.tensor(_EXAMPLE_LENGTHS)
    for t in contract.inputs(graph, cfg, precision):
        shape = [d if isinstance(d, int) else _EXAMPLE[d] for d in t.dims]
        if t.name in ("input_ids", "canvas_ids"):
            out.append(torch.randint(0, cfg.vocab_size, shape))
        elif t.name == "position_ids":
            out.append(lengths[:, None] + torch.arange(shape[1])[None, :])
        elif t.name == contract.PAST_LENGTH:
            out.append(lengths.clone())
        elif t.name == "temperature":
            out.append(torch.full(shape, 0.7))
        else:
            out.append(0.1 * torch.randn(shape).to(DTYPES[t.dtype]))
    return tuple(out)


def _dynamic_shapes(graph: str, cfg, precision: str):
    from torch.export import Dim

    dims = {contract.BATCH: Dim(contract.BATCH, min=1, max=4096), contract.SEQ: Dim(contract.SEQ, min=1, max=1 << 20),
            contract.KV_CAPACITY: Dim(contract.KV_CAPACITY, min=2, max=1 << 20)}
    specs = contract.inputs(graph, cfg, precision)
    per = [{k: dims[d] for k, d in enumerate(t.dims) if isinstance(d, str)} for t in specs]
    n_fixed = 3 if graph == contract.ENCODER else 5
    return (*per[:n_fixed], tuple(per[n_fixed:]))


def _dynamic_axes(graph: str, cfg, precision: str) -> dict:
    specs = contract.inputs(graph, cfg, precision) + contract.outputs(graph, cfg, precision)
    return {t.name: {k: d for k, d in enumerate(t.dims) if isinstance(d, str)} for t in specs}


def _name_dims(proto, graph: str, cfg, precision: str) -> None:
    """Set every graph input/output dim to the contract's name or size (exporters invent output dim names)."""
    specs = {t.name: t for t in contract.inputs(graph, cfg, precision) + contract.outputs(graph, cfg, precision)}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = specs[vi.name]
        shape = vi.type.tensor_type.shape
        while len(shape.dim) < len(t.dims):
            shape.dim.add()
        for d, want in zip(shape.dim, t.dims):
            if isinstance(want, int):
                d.dim_value = want
            else:
                d.dim_param = want


def export_graph(model: DiffusionGemma, graph: str, out_path: Path, precision: str,
                 exporter: str = "auto", opset: int = OPSET, translations: dict | None = None) -> dict:
    """Export one graph to out_path (model.onnx [+ model.onnx.data]); returns {exporter, seconds}.

    translations: custom_translation_table for the dynamo exporter (quantized models, dgemma.export_quant)."""
    import onnx

    cfg = model.cfg
    wrapper = (contract.ENCODER == graph and EncoderGraph or DenoiserGraph)(model).eval()
    args = example_inputs(graph, cfg, precision)
    in_names = [t.name for t in contract.inputs(graph, cfg, precision)]
    out_names = [t.name for t in contract.outputs(graph, cfg, precision)]
    t0, used, errors = time.perf_counter(), None, []
    tmp = out_path.with_suffix(".raw.onnx")
    for kind in (["dynamo", "legacy"] if exporter == "auto" else [exporter]):
        try:
            # the exporters' deprecation/axis-renaming warnings (and "torchvision is not installed") say nothing
            # actionable to a user of this CLI
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
                if kind == "dynamo":
                    prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=in_names,
                                             output_names=out_names, opset_version=opset, optimize=True,
                                             custom_translation_table=translations,
                                             dynamic_shapes=_dynamic_shapes(graph, cfg, precision), verbose=False)
                    proto = prog.model_proto
                else:
                    torch.onnx.export(wrapper, args, str(tmp), dynamo=False, input_names=in_names,
                                      output_names=out_names, opset_version=OPSET,
                                      dynamic_axes=_dynamic_axes(graph, cfg, precision))
                    proto = onnx.load(str(tmp))
            used = kind
            break
        except Exception as e:  # noqa: BLE001 - try the next exporter, report all failures if none works
            errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if used is None:
        raise ArtifactError(f"torch.onnx.export failed for the {graph} graph ({'; '.join(errors)}).")
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()
    _name_dims(proto, graph, cfg, precision)
    large = proto.ByteSize() > TWO_GB or sum(p.numel() * p.element_size() for p in model.parameters()) > TWO_GB
    if large:
        onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(out_path))
    else:
        onnx.save_model(proto, str(out_path))
        onnx.checker.check_model(proto)
    return {"exporter": used, "seconds": round(time.perf_counter() - t0, 3), "external_data": large,
            "fallback_reasons": errors}


def export_onnx(model: DiffusionGemma, precision: str, out_root: str | Path | None = None,
                checkpoint: str | Path | None = None, exporter: str = "auto", quantized=None) -> Path:
    """Both graphs + manifest.json into out_root/<precision>/, written atomically (temp dir, then rename).

    quantized: a dgemma.export.quantized.QuantizedExport for fp8/nvfp4 (the model is then its export model, already in
    the graph dtype: .to() would upcast the stored low-precision weights)."""
    import onnx

    dtype = contract.kv_dtype(precision)
    if (precision in ("fp8", "nvfp4")) != (quantized is not None):
        raise ConfigError(f"export precision {precision!r} needs a ModelOpt-quantized model: run `dgemma onnx "
                          f"--precision {precision}` (reads quantize/{precision}/, made by `make quantize "
                          f"PRECISION={precision}`)." if quantized is None else
                          f"a quantized export needs --precision fp8 or nvfp4, not {precision!r}.")
    opset, translations = (quantized.opset, quantized.translations) if quantized else (OPSET, None)
    model = (model if quantized else model.to(DTYPES[dtype])).eval()
    model.set_experts_impl("dense")  # grouped uses F.grouped_mm, which has no ONNX op
    out_root = Path(out_root) if out_root else current().onnx()
    final = out_root / precision
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{precision}-", dir=out_root))
    try:
        info = {}
        for g in contract.GRAPHS:
            (tmp / g).mkdir()
            info[g] = export_graph(model, g, tmp / g / "model.onnx", precision, exporter, opset, translations)
            files = sorted((tmp / g).iterdir())
            info[g]["files"] = {f.name: f.stat().st_size for f in files}
            info[g]["sha256"] = file_sha256(tmp / g / "model.onnx")
        manifest = {
            "schema": 1, "stage": "onnx", "precision": precision, "dtype": dtype,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": checkpoint_fingerprint(checkpoint) if checkpoint else None,
            "model_config": model.cfg.to_hf_dict() | {"canvas_length": model.cfg.canvas_length},
            "dgemma_version": __version__, "torch_version": torch.__version__,
            "onnx_version": onnx.__version__, "opset": opset, "experts_impl": "dense",
            "contract_sha256": contract.contract_hash(model.cfg, precision),
            "io_contract": contract.contract(model.cfg, precision), "graphs": info,
            **(quantized.manifest if quantized else {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.set_experts_impl("grouped")
    return final


